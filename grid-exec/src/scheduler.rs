//! The cluster scheduler (being built: issue 17).
