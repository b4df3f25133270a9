//! The bucketed executor (being built: issue 16).
