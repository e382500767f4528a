//! A network namespace joined to the test's own namespace by a veth pair: a node whose network
//! link the test can cut (`ip link set … down`) and restore.

use crate::{require, require_root, run};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One namespace; deleted (and its veth pair with it) when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The address of the test's side of the pair: where processes inside reach the outside.
    pub outside_ip: String,
    /// The address inside the namespace.
    pub inside_ip: String,
    veth: String,
}

impl Netns {
    /// A new namespace with loopback up and a point-to-point /30 to the test's namespace.
    pub fn create() -> Netns {
        require_root();
        require("ip", "iproute2");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are at most 15 bytes; pid and counter keep parallel tests apart.
        let tag = format!("{}{n}", pid % 100_000);
        let (name, veth, peer) = (
            format!("qz-ns{tag}"),
            format!("qzo{tag}"),
            format!("qzi{tag}"),
        );
        // 10.<pid-derived>.<n>.0/30: distinct per test process and per namespace.
        let subnet = format!("10.{}.{}", 100 + pid % 100, n % 250);
        let (outside_ip, inside_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns {
            name: name.clone(),
            outside_ip: outside_ip.clone(),
            inside_ip: inside_ip.clone(),
            veth: veth.clone(),
        };
        run(Command::new("ip").args([
            "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &name,
        ]));
        run(Command::new("ip").args(["addr", "add", &format!("{outside_ip}/30"), "dev", &veth]));
        run(Command::new("ip").args(["link", "set", &veth, "up"]));
        netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{inside_ip}/30"),
            "dev",
            &peer,
        ]);
        netns.exec(&["ip", "link", "set", &peer, "up"]);
        netns.exec(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    fn exec(&self, argv: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv));
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Drops every packet in and out of the namespace (loopback aside) while the link stays up;
    /// see [`drop_packets`]. `pass_packets` ends it.
    pub fn drop_packets(&self) {
        drop_packets(&self.name);
    }

    /// Lets packets through again after [`Netns::drop_packets`].
    pub fn pass_packets(&self) {
        pass_packets(&self.name);
    }

    /// Cuts the namespace off: its side of the pair goes down, as when a cable is pulled.
    pub fn cut(&self) {
        run(Command::new("ip").args(["link", "set", &self.veth, "down"]));
    }

    /// Brings the link back.
    pub fn restore(&self) {
        run(Command::new("ip").args(["link", "set", &self.veth, "up"]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the peer inside it, and with it the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Drops every packet in and out of network namespace `netns` (loopback aside) while its link
/// stays up: a node that is silent for a while without any connection breaking (a stalled
/// switch, a congested network). [`pass_packets`] ends it. (`netem` is not in this kernel;
/// iptables is.)
pub fn drop_packets(netns: &str) {
    require("iptables", "iptables");
    for rule in [["INPUT", "-i"], ["OUTPUT", "-o"]] {
        run(Command::new("ip")
            .args(["netns", "exec", netns, "iptables", "-I", rule[0], "1", "!"])
            .args([rule[1], "lo", "-j", "DROP"]));
    }
}

/// Lets packets through again after [`drop_packets`].
pub fn pass_packets(netns: &str) {
    for rule in [["INPUT", "-i"], ["OUTPUT", "-o"]] {
        run(Command::new("ip")
            .args(["netns", "exec", netns, "iptables", "-D", rule[0], "!"])
            .args([rule[1], "lo", "-j", "DROP"]));
    }
}
