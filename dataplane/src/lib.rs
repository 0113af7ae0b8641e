//! Tollgate data plane.
