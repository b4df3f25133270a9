//! The member executor (being built: issue 16).
