//! One module per scenario. A scenario sets up each system it compares (ours
//! and the baselines of the same run), drives its workload through each, and
//! records figures, or the reason a baseline is unavailable. `netstack` uses
//! the shared [`Results`](crate::results::Results) (JSON and table) and
//! [`workload`](crate::workload) modules, and so do `forward` (the laptop's
//! `gstacks mesh forward` beside loopback) and `proxy` (the agent-to-agent
//! path beside loopback, the raw mesh, dnsmasq and the policy target).
//! `support` has what the scenarios with real processes share (the control
//! plane, agents, child guards, free ports).

pub mod control;
pub mod dns;
pub mod forward;
pub mod netstack;
pub mod proxy;
pub mod support;
