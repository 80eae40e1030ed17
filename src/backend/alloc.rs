//! alloc: leases only. The agent acquires, publishes and renews this node's
//! subnet and writes subnet.env; someone else (a cloud controller, a router)
//! routes the pod subnets, so nothing is programmed and — as upstream, which
//! disables its Node informer for alloc — no peer is watched.

use crate::dataplane::model::PeerEntries;
use crate::dataplane::netlink::Netlink;
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease};

use super::{Backend, Prepared};

pub struct Alloc;

impl Backend for Alloc {
    fn type_name(&self) -> &'static str {
        "alloc"
    }

    fn routes_peers(&self) -> bool {
        false
    }

    fn watches_peers(&self) -> bool {
        false
    }

    async fn prepare(
        &mut self,
        _nl: &Netlink,
        ext: &ExternalInterface,
    ) -> anyhow::Result<Prepared> {
        Ok(Prepared {
            mtu: ext.mtu,
            data: BackendData::Alloc,
            data_v6: Some(BackendData::Alloc),
        })
    }

    fn entries(
        &self,
        _ext: &ExternalInterface,
        _lease: &Lease,
        _v6: bool,
    ) -> Result<Option<PeerEntries>, String> {
        Ok(None)
    }
}
