//! Load tools.
