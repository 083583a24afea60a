//! dnsmasq on a loopback port for the tests that need DNS: MX and address
//! records for delivery, TXT records for DKIM keys.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::require_tool;

/// dnsmasq serving MX and address records on a loopback port; killed on drop.
pub struct Dns {
    pub addr: SocketAddr,
    child: Child,
}

impl Dns {
    /// Starts dnsmasq on a free port; a port another test took meanwhile
    /// (dnsmasq binds TCP as well as UDP) makes it exit, so it is retried on
    /// another.
    pub fn start(records: &[String]) -> Dns {
        for _ in 0..5 {
            if let Some(dns) = Dns::try_start(records) {
                return dns;
            }
        }
        panic!("dnsmasq exited at start on five ports in a row");
    }

    fn try_start(records: &[String]) -> Option<Dns> {
        let bin = require_tool("dnsmasq");
        let port = free_udp_port();
        let mut command = Command::new(bin);
        command
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--user=root",
                "--log-facility=-",
                "--pid-file=",
            ])
            .arg(format!("--port={port}"))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().unwrap();
        let mut dns = Dns {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        };
        dns.wait_answering().then_some(dns)
    }

    /// Waits until dnsmasq answers a query (any answer), so a test never
    /// races its start-up; `false` if it exited (its port taken, say).
    fn wait_answering(&mut self) -> bool {
        // A query for probe.test, type A, class IN, recursion desired.
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["probe", "test"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reply = [0u8; 512];
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("dnsmasq on {} exited at start: {status}", self.addr);
                return false;
            }
            let _ = socket.send_to(&query, self.addr);
            if matches!(socket.recv_from(&mut reply), Ok((n, _)) if n >= 12 && reply[..2] == [0x12, 0x34])
            {
                return true;
            }
        }
        panic!("dnsmasq on {} does not answer", self.addr);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
