//! A NAT lab: home networks behind NAT routers and a public host, made of Linux network
//! namespaces, for end-to-end tests of volunteers at home (issue 15).
//!
//! Each [`NatLab`] is its own small internet, private to one test:
//!
//! ```text
//! h1  10.S.1.2 --eth0/lan0-- nat1 [NAT] 10.S.0.101 --wan0/h1--+
//! h2  10.S.2.2 --eth0/lan0-- nat2 [NAT] 10.S.0.102 --wan0/h2--+-- br0 in inet ("the internet")
//!                                  pub  10.S.0.10  --pub0/p0--+
//!                                  pub1 10.S.0.11  --pub0/p1--+   (add_public_host: .11 and up)
//! ```
//!
//! The routers masquerade their LAN behind their WAN address (port-preserving, or symmetric with
//! `--random-fully`) and drop every unsolicited inbound packet, as a home router does. Nothing
//! routes the private LAN ranges across "the internet". IPv6 is off in every namespace, so no
//! link-local path goes around the IPv4 rules.
//!
//! The lab owns only what it makes: namespaces named `gl-<pid>-<n>-<label>-<role>` and the veth
//! pairs and bridge inside them (interfaces are created inside the lab's namespaces, never in
//! the caller's). Dropping it, also while a test panics, kills every process left in its
//! namespaces and deletes them. A lab that a killed test process left behind is swept by the
//! next [`NatLab::new`]. Isolation comes from the namespaces, so two labs could even use the
//! same addresses; each lab still picks its own second octet `S`, which keeps logs readable.
//!
//! It needs root, `ip` (iproute2), `iptables` with `iptables-restore`, and `sysctl`; without them
//! [`NatLab::new`] says why in a [`Skip`]. With `GRID_NAT_LAB=require` in the environment a
//! lab that cannot be built fails the test instead, for CI machines that must run these tests.
//!
//! ```no_run
//! use grid_tests::nat_lab::{Nat, NatLab};
//!
//! let lab = match NatLab::new("demo") {
//!     Ok(lab) => lab,
//!     Err(skip) => return eprintln!("skipped: {skip}"),
//! };
//! let home = lab.add_home(Nat::PortPreserving);
//! let status = home.host().command("ip").args(["route"]).status().unwrap();
//! assert!(status.success());
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Set to `require` to fail, not skip, when a lab cannot be built.
pub const REQUIRE_ENV: &str = "GRID_NAT_LAB";

/// Most home networks in one lab (their WAN addresses are 10.S.0.101 and up).
pub const MAX_HOMES: u8 = 100;
/// Most hosts on "the internet" besides the public one (10.S.0.11 to 10.S.0.90).
pub const MAX_PUBLIC_HOSTS: u8 = 80;

/// How long dropping a lab waits for the processes it killed to leave its namespaces.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Labs made by this process so far: part of each lab's names and of its addresses.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Why a lab cannot be built on this machine; the test prints it and passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a home router translates its LAN's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// MASQUERADE keeping the source port when it is free: endpoint-independent mapping, the
    /// kind hole punching gets through.
    PortPreserving,
    /// MASQUERADE `--random-fully`: a new random port per connection, as a symmetric NAT does;
    /// hole punching fails and only a relay helps.
    Symmetric,
}

/// One machine of the lab: a network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    ns: String,
    ip: Ipv4Addr,
}

impl Host {
    /// Its address: on "the internet" for the public host and a router, on its LAN for a home
    /// host.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its network namespace's name (for `ip netns exec`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// A command running `program` inside this host's namespace (`ip netns exec NS program`).
    ///
    /// `ip netns exec` replaces itself with the program, so the child's pid is the program's.
    /// The file system is the caller's: Unix sockets and data directories work across hosts.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Tries a TCP connection from this host to `to`, waiting at most `timeout`.
    pub fn tcp_probe(&self, to: SocketAddrV4, timeout: Duration) -> Probe {
        let secs = format!("{:.1}", timeout.as_secs_f64());
        let out = self
            .command("timeout")
            .args([&secs, "bash", "-c", "exec 3<>\"/dev/tcp/$0/$1\""])
            .arg(to.ip().to_string())
            .arg(to.port().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run a TCP probe with ip netns exec timeout bash");
        match out.status.code() {
            Some(0) => Probe::Connected,
            Some(124) => Probe::TimedOut,
            _ => Probe::Failed(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        }
    }
}

/// What became of a TCP connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The connection opened.
    Connected,
    /// Nothing answered before the timeout: the packets were dropped.
    TimedOut,
    /// It failed at once (refused, or no route), with the error.
    Failed(String),
}

/// One home network: a NAT router and the host behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    host: Host,
    router: Host,
    nat: Nat,
}

impl Home {
    /// The host behind the NAT (its [`Host::ip`] is its LAN address).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The NAT router (its [`Host::ip`] is its WAN address).
    pub fn router(&self) -> &Host {
        &self.router
    }

    /// The router's address on "the internet": what the outside sees of this home.
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.router.ip
    }

    /// How the router translates.
    pub fn nat(&self) -> Nat {
        self.nat
    }
}

/// A private internet of network namespaces; everything it made goes when it is dropped.
#[derive(Debug)]
pub struct NatLab {
    prefix: String,
    net: u8,
    inet: String,
    public: Host,
    /// Every namespace made so far, in creation order (deleted in reverse).
    namespaces: Mutex<Vec<String>>,
    homes: Mutex<u8>,
    public_hosts: Mutex<u8>,
}

impl NatLab {
    /// Builds "the internet" (a bridge in its own namespace) and the public host on it.
    /// `label` (a few letters naming the test) goes into the namespace names.
    pub fn new(label: &str) -> Result<NatLab, Skip> {
        match Self::build(label) {
            Ok(lab) => Ok(lab),
            Err(skip) if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "require") => {
                panic!("the NAT lab cannot be built and {REQUIRE_ENV}=require: {skip}")
            }
            Err(skip) => Err(skip),
        }
    }

    fn build(label: &str) -> Result<NatLab, Skip> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Skip("not root: the NAT lab needs network namespaces and iptables".into()));
        }
        let tools = [
            ("ip", "iproute2"),
            ("iptables", "iptables"),
            ("iptables-restore", "iptables"),
            ("sysctl", "procps"),
        ];
        for (tool, package) in tools {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(Skip(format!(
                    "`{tool}` is not installed (Debian package {package}; \
                     scripts/lib/common.sh installs it)"
                )));
            }
        }
        sweep_stale_labs();

        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let label: String =
            label.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>();
        let prefix = format!("gl-{pid}-{n}-{label}");
        // 20..=239, different for labs made close together.
        let net = 20 + ((pid.wrapping_mul(31).wrapping_add(n)) % 220) as u8;
        let inet = format!("{prefix}-inet");
        let public = Host { ns: format!("{prefix}-pub"), ip: Ipv4Addr::new(10, net, 0, 10) };
        let lab = NatLab {
            prefix,
            net,
            inet: inet.clone(),
            public: public.clone(),
            namespaces: Mutex::new(Vec::new()),
            homes: Mutex::new(0),
            public_hosts: Mutex::new(0),
        };

        lab.add_ns(&inet).map_err(|e| Skip(format!("cannot create a network namespace: {e}")))?;
        // iptables needs nf_tables (or the legacy tables) in the kernel, usable in a namespace.
        run(Command::new("ip").args(["netns", "exec", &inet, "iptables", "-t", "nat", "-S"]))
            .map_err(|e| Skip(format!("iptables does not work in a network namespace: {e}")))?;
        let public_net = || -> Result<(), String> {
            ip(&inet, &["link", "add", "br0", "type", "bridge"])?;
            ip(&inet, &["link", "set", "br0", "up"])?;
            lab.add_ns(&public.ns)?;
            let pns = public.ns.as_str();
            ip(
                &inet,
                &["link", "add", "p0", "type", "veth", "peer", "name", "pub0", "netns", pns],
            )?;
            ip(&inet, &["link", "set", "p0", "master", "br0", "up"])?;
            ip(pns, &["addr", "add", &format!("{}/24", public.ip), "dev", "pub0"])?;
            ip(pns, &["link", "set", "pub0", "up"])
        };
        if let Err(e) = public_net() {
            panic!("cannot build the public network of lab {}: {e}", lab.prefix);
        }
        Ok(lab)
    }

    /// The public host: reachable from everywhere on "the internet".
    pub fn public(&self) -> &Host {
        &self.public
    }

    /// Adds another host on "the internet", beside [`NatLab::public`] (10.S.0.11 and up): with
    /// two of them, nodes meet on one flat network, the baseline to compare NATs against.
    ///
    /// Panics when the host cannot be built (the lab itself could be, so that is a bug).
    pub fn add_public_host(&self) -> Host {
        let k = {
            let mut n = self.public_hosts.lock().expect("public hosts lock");
            assert!(*n < MAX_PUBLIC_HOSTS, "at most {MAX_PUBLIC_HOSTS} extra public hosts per lab");
            *n += 1;
            *n
        };
        let host = Host {
            ns: format!("{}-pub{k}", self.prefix),
            ip: Ipv4Addr::new(10, self.net, 0, 10 + k),
        };
        let port = format!("p{k}");
        let r = (|| {
            self.add_ns(&host.ns)?;
            let (inet, hns) = (self.inet.as_str(), host.ns.as_str());
            ip(
                inet,
                &["link", "add", &port, "type", "veth", "peer", "name", "pub0", "netns", hns],
            )?;
            ip(inet, &["link", "set", &port, "master", "br0", "up"])?;
            ip(hns, &["addr", "add", &format!("{}/24", host.ip), "dev", "pub0"])?;
            ip(hns, &["link", "set", "pub0", "up"])
        })();
        if let Err(e) = r {
            panic!("cannot build public host {k} of lab {}: {e}", self.prefix);
        }
        host
    }

    /// Adds a home network: a NAT router on "the internet" and a host behind it.
    ///
    /// Panics when the network cannot be built (the lab itself could be, so that is a bug).
    pub fn add_home(&self, nat: Nat) -> Home {
        let i = {
            let mut homes = self.homes.lock().expect("homes lock");
            assert!(*homes < MAX_HOMES, "at most {MAX_HOMES} homes per lab");
            *homes += 1;
            *homes
        };
        let router = Host {
            ns: format!("{}-nat{i}", self.prefix),
            ip: Ipv4Addr::new(10, self.net, 0, 100 + i),
        };
        let host =
            Host { ns: format!("{}-h{i}", self.prefix), ip: Ipv4Addr::new(10, self.net, i, 2) };
        let lan = format!("10.{}.{i}.0/24", self.net);
        let gateway = Ipv4Addr::new(10, self.net, i, 1);
        let port = format!("h{i}");
        let r = (|| {
            self.add_ns(&router.ns)?;
            self.add_ns(&host.ns)?;
            let (inet, rns, hns) = (self.inet.as_str(), router.ns.as_str(), host.ns.as_str());
            ip(
                inet,
                &["link", "add", &port, "type", "veth", "peer", "name", "wan0", "netns", rns],
            )?;
            ip(inet, &["link", "set", &port, "master", "br0", "up"])?;
            ip(
                rns,
                &["link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", hns],
            )?;
            ip(rns, &["addr", "add", &format!("{}/24", router.ip), "dev", "wan0"])?;
            ip(rns, &["link", "set", "wan0", "up"])?;
            ip(rns, &["addr", "add", &format!("{gateway}/24"), "dev", "lan0"])?;
            ip(rns, &["link", "set", "lan0", "up"])?;
            ip(hns, &["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
            ip(hns, &["link", "set", "eth0", "up"])?;
            ip(hns, &["route", "add", "default", "via", &gateway.to_string()])?;
            run(Command::new("ip").args([
                "netns",
                "exec",
                rns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))?;
            let masquerade = match nat {
                Nat::PortPreserving => "-j MASQUERADE",
                Nat::Symmetric => "-j MASQUERADE --random-fully",
            };
            let rules = format!(
                "*nat\n\
                 :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
                 :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
                 -A POSTROUTING -s {lan} -o wan0 {masquerade}\n\
                 COMMIT\n\
                 *filter\n\
                 :INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                 -A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
                 -A INPUT -i wan0 -j DROP\n\
                 -A FORWARD -i lan0 -o wan0 -j ACCEPT\n\
                 -A FORWARD -i wan0 -o lan0 -m conntrack --ctstate ESTABLISHED,RELATED \
                 -j ACCEPT\n\
                 COMMIT\n"
            );
            run_with_input(
                Command::new("ip").args(["netns", "exec", rns, "iptables-restore"]),
                &rules,
            )
        })();
        if let Err(e) = r {
            panic!("cannot build home network {i} of lab {}: {e}", self.prefix);
        }
        Home { host, router, nat }
    }

    /// The names of the namespaces made so far.
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.lock().expect("namespaces lock").clone()
    }

    /// Creates a namespace with loopback up and IPv6 off, and records it for the teardown.
    fn add_ns(&self, ns: &str) -> Result<(), String> {
        run(Command::new("ip").args(["netns", "add", ns]))?;
        self.namespaces.lock().expect("namespaces lock").push(ns.to_string());
        // Before any interface exists, so `default` covers the veths too. A kernel without IPv6
        // has nothing to turn off.
        let _ = run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]));
        ip(ns, &["link", "set", "lo", "up"])
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        let namespaces =
            std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        teardown(&namespaces);
    }
}

/// Kills every process in `namespaces`, waits until they are gone, and deletes the namespaces.
/// Never panics: it runs while tests unwind.
fn teardown(namespaces: &[String]) {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let mut left = 0;
        for ns in namespaces {
            for pid in ns_pids(ns) {
                left += 1;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if left == 0 || Instant::now() > deadline {
            if left > 0 {
                eprintln!("nat lab: {left} processes still in {namespaces:?} after SIGKILL");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for ns in namespaces.iter().rev() {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
            eprintln!("nat lab: cannot delete namespace {ns}: {e}");
        }
    }
}

/// The pids of the processes in a namespace (zombies have left it).
fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the namespaces of labs whose process is gone (killed before its labs dropped).
fn sweep_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    let stale: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| {
            let mut parts = ns.split('-');
            parts.next() == Some("gl")
                && parts.next().and_then(|p| p.parse::<u32>().ok()).is_some_and(|pid| {
                    pid != std::process::id()
                        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .map(str::to_string)
        .collect();
    if !stale.is_empty() {
        eprintln!("nat lab: removing namespaces of dead test processes: {stale:?}");
        teardown(&stale);
    }
}

/// `ip -n NS args...`
fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// Runs a setup command; its error names the command and says what it printed.
fn run(c: &mut Command) -> Result<(), String> {
    run_with_input(c, "")
}

fn run_with_input(c: &mut Command, input: &str) -> Result<(), String> {
    use std::io::Write;
    let shown = format!("{c:?}");
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|e| format!("{shown}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
