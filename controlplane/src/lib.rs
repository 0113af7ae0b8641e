//! Tollgate control plane.
