//! The lab's network: one network namespace per node, each joined by a veth pair to a bridge in
//! the lab's own namespace, so that the nodes reach each other (and the lab reaches them) over a
//! real L2 segment, and a node's link can be cut as a cable is pulled.

use quiesce_testbed::{require, require_root, run};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One node's namespace and its address on the bridge.
#[derive(Debug)]
pub struct NodeNet {
    pub netns: String,
    pub ip: String,
    /// The bridge's end of the node's veth pair: what a cut takes down.
    veth: String,
}

/// The bridge and the nodes' namespaces; all deleted when dropped.
#[derive(Debug)]
pub struct Network {
    pub bridge: String,
    /// The lab's own address on the bridge.
    pub lab_ip: String,
    pub nodes: Vec<NodeNet>,
}

impl Network {
    /// A bridge with `nodes` namespaces on a /24 of their own: node i (from 0) at `.i+1`, the
    /// lab at `.254`.
    pub fn create(nodes: usize) -> Network {
        require_root();
        require("ip", "iproute2");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are at most 15 bytes; pid and counter keep concurrent labs apart.
        let tag = format!("{}{n}", pid % 100_000);
        let subnet = format!("10.{}.{}", 200 + pid % 50, (pid / 50 + n) % 250);
        let bridge = format!("qzlb{tag}");
        let mut network = Network {
            bridge: bridge.clone(),
            lab_ip: format!("{subnet}.254"),
            nodes: Vec::new(),
        };
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", network.lab_ip),
            "dev",
            &bridge,
        ]));
        run(Command::new("ip").args(["link", "set", &bridge, "up"]));
        for i in 0..nodes {
            let netns = format!("qzl{tag}n{}", i + 1);
            let veth = format!("qzlv{tag}n{}", i + 1);
            let ip = format!("{subnet}.{}", i + 1);
            run(Command::new("ip").args(["netns", "add", &netns]));
            network.nodes.push(NodeNet {
                netns: netns.clone(),
                ip: ip.clone(),
                veth: veth.clone(),
            });
            run(Command::new("ip").args([
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ]));
            run(Command::new("ip").args(["link", "set", &veth, "master", &bridge]));
            run(Command::new("ip").args(["link", "set", &veth, "up"]));
            let exec = |argv: &[&str]| {
                run(Command::new("ip")
                    .args(["netns", "exec", &netns])
                    .args(argv));
            };
            exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            exec(&["ip", "link", "set", "eth0", "up"]);
            exec(&["ip", "link", "set", "lo", "up"]);
        }
        network
    }

    /// A command that runs `program` inside node `i`'s namespace (`ip netns exec` execs it: the
    /// child's pid is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.nodes[i].netns])
            .arg(program);
        command
    }

    /// Cuts node `i` off the bridge: its link goes down, as when a cable is pulled.
    pub fn cut(&self, i: usize) {
        run(Command::new("ip").args(["link", "set", &self.nodes[i].veth, "down"]));
    }

    /// Brings node `i`'s link back.
    pub fn restore(&self, i: usize) {
        run(Command::new("ip").args(["link", "set", &self.nodes[i].veth, "up"]));
    }

    /// Drops every packet in and out of node `i` while its link stays up (a node gone silent
    /// without any connection breaking).
    pub fn drop_packets(&self, i: usize) {
        quiesce_testbed::drop_packets(&self.nodes[i].netns);
    }

    /// Lets node `i`'s packets through again.
    pub fn pass_packets(&self, i: usize) {
        quiesce_testbed::pass_packets(&self.nodes[i].netns);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Deleting the namespace destroys the peer inside it, and with it the pair.
            let _ = Command::new("ip")
                .args(["link", "del", &node.veth])
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &node.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
