//! The thread-per-core runtime and the threads around it.
//!
//! [`server`] (workers, listeners, shutdown), [`inbox`] (every core's message type), [`mailbox`] (one core
//! asking another, without blocking either), [`snapshot`] (the immutable configuration every core reads),
//! [`resolve`] (DNS, off the cores), [`credentials`] (the thread that keeps issuers' keys and the
//! service-token set fresh), [`reload`] (which settings a reload cannot apply).

pub mod credentials;
pub mod inbox;
pub mod mailbox;
pub mod reload;
pub mod resolve;
pub mod server;
pub mod snapshot;
