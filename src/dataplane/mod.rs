//! The dataplane: what the kernel should hold ([`model`]) and the netlink layer
//! that reads and changes it ([`netlink`]).

pub mod model;
pub mod netlink;
