//! Interface re-selection on full checks: the node's address changed, so the
//! device, the desired routes and (through the lease keeper) the published
//! lease follow the new one.

use super::{show, Reconciler};
use crate::backend::Backend;
use crate::iface;
use crate::manager::LeaseRequest;

impl<B: Backend> Reconciler<B> {
    /// On a full check: has the selected interface (or its address) changed?
    /// Then everything follows the new one: the VXLAN device's `local`, the
    /// desired routes, and (through the lease keeper) the published lease. A pinned
    /// `--public-ip` stays what it is (select() takes it from the flag).
    pub(super) async fn reselect(&mut self) {
        let (v4, v6) = (self.intake.conf.v4.is_some(), self.intake.conf.v6.is_some());
        let ext = match iface::select(&self.nl, &self.flags, v4, v6).await {
            Ok(e) => e,
            Err(e) => {
                // E.g. between an address's removal and its successor's arrival:
                // keep the old selection; the next event brings another check.
                tracing::debug!("re-selecting the interface: {e}");
                return;
            }
        };
        if ext == self.ext {
            return;
        }
        tracing::warn!(
            "the node's interface changed: {} ({}) -> {} ({}); following it",
            self.ext.name,
            show(&[
                self.ext.public_ip.map(Into::into),
                self.ext.public_ipv6.map(Into::into)
            ]),
            ext.name,
            show(&[
                ext.public_ip.map(Into::into),
                ext.public_ipv6.map(Into::into)
            ]),
        );
        let req = LeaseRequest {
            public_ip: ext.public_ip.filter(|_| v4),
            public_ipv6: ext.public_ipv6.filter(|_| v6),
            ..self.req.clone()
        };
        if req != self.req {
            self.intake.own.public_ip = req.public_ip;
            self.intake.own.public_ipv6 = req.public_ipv6;
            self.req = req.clone();
            self.publish.send_replace(req);
        }
        self.ext = ext;
        for p in &mut self.planes {
            p.known = false;
        }
    }
}
