//! The proxy's listening sockets and threads: one pingora service per thread, each with its
//! own `SO_REUSEPORT` socket on the same address, as nginx's `listen ... reuseport` does.
//!
//! Why: with `work_stealing: false`, pingora runs one single-threaded tokio runtime per
//! thread. A service with `threads: N` has one accept loop on one of them, which registers
//! each accepted socket with *its* reactor, then spawns the connection on a random runtime
//! (`pingora_runtime::current_handle`). Every readiness event of such a connection then
//! crosses threads: the accepting reactor wakes the task's runtime through its eventfd, a
//! `write` plus a context switch per event (0.5 to 0.6 per cached hit, measured with
//! `strace -f -c`; see BENCHMARKS.md). A service with `threads: 1` has a single runtime, so
//! the connection stays on the runtime whose reactor accepted it. N such services give the
//! N threads; each needs its own socket, or all N accept loops wait on one socket and every
//! new connection wakes all of them.
//!
//! Each thread runs tfmirror's own accept loop ([`accept`]), not pingora's: pingora's loop
//! registers an accepted socket with its reactor before the app sees it, so the connection
//! could not move to another thread afterwards. Ours decides first, and registers the socket
//! only on the thread that serves it.
//!
//! The kernel spreads new connections over the sockets of a `SO_REUSEPORT` group by a hash of
//! the connection's addresses. Over a few long-lived connections that is far from even (12
//! connections over 3 threads came out 1/7/5 and 5/7/1 in a test), so a thread that accepts
//! a connection while another holds fewer hands it over ([`balance`]): one wake-up of that
//! thread per connection, none per request. A connection then stays on its thread for its
//! whole life, as with nginx's workers. `tfmirror_client_connections` shows the spread.
//!
//! Sockets and graceful upgrades: pingora keys listening sockets by their address string,
//! both when it reuses one (two services on the same string share a socket) and when a new
//! process takes the sockets over (`--upgrade`). So tfmirror binds the sockets itself and files
//! them in pingora's table, which pingora hands to an upgrading process, under distinct keys:
//! the listen address for the first, `ADDR#i` for the others. An upgrading process finds each
//! key and uses the inherited socket; keys it does not find (more threads than before) are
//! bound and join the group. An inherited socket without `SO_REUSEPORT` (a predecessor built
//! before this module) cannot be joined: every thread then accepts from that one socket, and
//! the balance still evens the threads out.
//!
//! `SO_REUSEPORT` would let a second tfmirror on the same port silently share its traffic, so
//! a fresh start first checks that the address is free with a plain bind.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::TlsSettings;
use pingora::server::{ListenFds, ShutdownWatch};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

mod accept;
mod balance;
pub(crate) mod conn;
pub(crate) mod sendfile;

use balance::Balance;

/// pingora's own listen backlog.
const BACKLOG: i32 = 65535;
/// A fresh start waits this long for the address to be released (a restart under a
/// supervisor), as pingora's own bind does.
const BIND_TRIES: u32 = 30;
const BIND_STEP: Duration = Duration::from_secs(1);

/// The key of worker `i`'s socket in pingora's table of listening sockets.
pub fn socket_key(addr: SocketAddr, i: usize) -> String {
    if i == 0 {
        addr.to_string()
    } else {
        format!("{addr}#{i}")
    }
}

/// The sockets of all workers: bound (or adopted) once, by whichever worker starts first.
pub struct Group {
    addr: SocketAddr,
    threads: usize,
    /// Each worker's open connections, and the way to hand it one.
    balance: Arc<Balance>,
    /// `Some(keys)` once resolved: the key each worker listens on.
    resolved: Mutex<Option<Vec<String>>>,
}

impl Group {
    pub fn new(addr: SocketAddr, threads: usize) -> Arc<Group> {
        Arc::new(Group {
            addr,
            threads,
            balance: Balance::new(threads),
            resolved: Mutex::new(None),
        })
    }

    /// The key worker `i` listens on, binding the group's sockets on first use.
    fn key_for(&self, fds: &ListenFds, i: usize) -> io::Result<String> {
        let mut resolved = self.resolved.lock().expect("workers lock");
        if resolved.is_none() {
            *resolved = Some(self.bind_all(fds, BIND_TRIES)?);
        }
        Ok(resolved.as_ref().expect("just resolved")[i].clone())
    }

    /// Worker `i`'s listening socket, on its thread's reactor. A worker owns the socket filed
    /// under its own key (closed when it stops accepting, as pingora's listeners are); where
    /// all workers share one inherited socket, the others accept from a duplicate of it.
    #[allow(unsafe_code)]
    fn listener(&self, fds: &ListenFds, i: usize) -> io::Result<TcpListener> {
        let key = self.key_for(fds, i)?;
        let raw = *fds.lock().get(&key).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no listening socket was filed")
        })?;
        // SAFETY: the descriptor is open: the group bound it, or pingora received it from
        // the previous process, and filed it. Nothing in the process closes or owns it but
        // the worker whose key it is, which takes it over here, once (a service starts
        // once); workers sharing it (an inherited socket without SO_REUSEPORT) only borrow
        // it for as long as it takes to duplicate it. pingora itself only sends the number
        // to an upgrading process, before any worker stops.
        let owned = if key == socket_key(self.addr, i) {
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            unsafe { BorrowedFd::borrow_raw(raw) }.try_clone_to_owned()?
        };
        let std = std::net::TcpListener::from(owned);
        std.set_nonblocking(true)?;
        TcpListener::from_std(std)
    }

    /// Adopt the sockets `fds` holds under the group's keys, bind the missing ones; returns
    /// the key each worker listens on.
    fn bind_all(&self, fds: &ListenFds, tries: u32) -> io::Result<Vec<String>> {
        let keys: Vec<String> = (0..self.threads)
            .map(|i| socket_key(self.addr, i))
            .collect();
        let mut table = fds.lock();
        let inherited = keys.iter().filter(|k| table.get(k).is_some()).count();
        if inherited == 0 {
            wait_free(self.addr, tries)?;
        }
        for (i, key) in keys.iter().enumerate() {
            if table.get(key).is_some() {
                continue;
            }
            match bind_reuseport(self.addr) {
                Ok(socket) => table.add(key.clone(), socket.into_raw_fd()),
                Err(e) if i > 0 && inherited > 0 && e.kind() == io::ErrorKind::AddrInUse => {
                    tracing::warn!(
                        listen = %self.addr,
                        "the inherited listening socket has no SO_REUSEPORT (upgrade from an \
                         older tfmirror): all threads accept from it until the next restart"
                    );
                    return Ok(vec![keys[0].clone(); self.threads]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(keys)
    }
}

/// Fail like an ordinary bind when something else listens on `addr` (including another
/// tfmirror's `SO_REUSEPORT` group): a plain bind, never listening, retried for a while.
fn wait_free(addr: SocketAddr, tries: u32) -> io::Result<()> {
    let mut tried = 1;
    loop {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        match probe.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tried < tries => {
                tried += 1;
                tracing::warn!(listen = %addr, "address in use, trying again");
                std::thread::sleep(BIND_STEP);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A listening socket in `addr`'s `SO_REUSEPORT` group, non-blocking as pingora expects.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// One thread of the proxy: a pingora service with `threads: 1`, accepting on its own
/// socket with tfmirror's accept loop ([`accept`]).
pub struct Worker<A> {
    name: String,
    index: usize,
    group: Arc<Group>,
    tls: Option<TlsSettings>,
    app: Option<A>,
    /// The TLS handshake's time limit.
    handshake: Duration,
}

impl<A> Worker<A> {
    /// Worker `index` of `group`, serving `app`; TLS when `tls` is given, its handshake
    /// bounded by `handshake`.
    pub fn new(
        group: Arc<Group>,
        index: usize,
        app: A,
        tls: Option<TlsSettings>,
        handshake: Duration,
    ) -> Worker<A> {
        Worker {
            name: format!("tfmirror-{index}"),
            index,
            group,
            tls,
            app: Some(app),
            handshake,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> pingora::services::Service for Worker<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        // pingora always passes its table on Unix.
        let fds = fds.expect("pingora passes its listening sockets");
        let listener = match self.group.listener(&fds, self.index) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %self.group.addr, error = %e, "cannot listen");
                crate::logbuf::flush();
                std::process::exit(1);
            }
        };
        let app = Arc::new(self.app.take().expect("a service starts once"));
        let serving = Arc::new(accept::Serving {
            index: self.index,
            app: app.clone(),
            tls: self.tls.take().map(|t| Arc::new(t.build())),
            balance: self.group.balance.clone(),
            handshake: self.handshake,
            shutdown,
        });
        accept::run(listener, serving).await;
        // As pingora's listening service ends.
        app.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// One runtime: connections run where they were accepted.
    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    /// The keys this worker may claim, so that pingora keeps them when a new process
    /// inherits them (and closes inherited sockets that no worker claims).
    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![socket_key(self.group.addr, self.index)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::server::Fds;

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn table() -> ListenFds {
        Arc::new(Fds::new().into())
    }

    /// Listening sockets on `addr`'s port, from the kernel's own table.
    fn listening(addr: SocketAddr) -> usize {
        let port = format!(":{:04X} ", addr.port());
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&port) && cols[3] == "0A"
            })
            .count()
    }

    #[test]
    fn keys_are_the_address_then_numbered() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(socket_key(addr, 0), "127.0.0.1:8080");
        assert_eq!(socket_key(addr, 1), "127.0.0.1:8080#1");
    }

    #[test]
    fn a_fresh_start_binds_one_socket_per_worker() {
        let addr = free_addr();
        let fds = table();
        let keys = Group::new(addr, 3).bind_all(&fds, 1).unwrap();
        assert_eq!(
            keys,
            (0..3).map(|i| socket_key(addr, i)).collect::<Vec<_>>()
        );
        let raw: Vec<_> = keys.iter().map(|k| *fds.lock().get(k).unwrap()).collect();
        assert!(raw[0] != raw[1] && raw[1] != raw[2] && raw[0] != raw[2]);
        assert_eq!(listening(addr), 3);
    }

    #[test]
    fn an_upgrade_adopts_the_inherited_sockets_and_adds_missing_ones() {
        let addr = free_addr();
        let fds = table();
        Group::new(addr, 1).bind_all(&fds, 1).unwrap();
        let first = *fds.lock().get(&socket_key(addr, 0)).unwrap();
        // The new process has one thread more: the old socket is kept, one joins the group,
        // and the address being in use (by the group itself) is no error.
        let keys = Group::new(addr, 2).bind_all(&fds, 1).unwrap();
        assert_eq!(keys, vec![socket_key(addr, 0), socket_key(addr, 1)]);
        assert_eq!(*fds.lock().get(&keys[0]).unwrap(), first);
        assert_eq!(listening(addr), 2);
        // Same threads again: nothing new is bound.
        Group::new(addr, 2).bind_all(&fds, 1).unwrap();
        assert_eq!(listening(addr), 2);
    }

    #[test]
    fn a_second_instance_on_the_same_address_is_refused() {
        let addr = free_addr();
        Group::new(addr, 2).bind_all(&table(), 1).unwrap();
        let err = Group::new(addr, 2).bind_all(&table(), 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(listening(addr), 2);
        // Anything else listening there, too.
        let addr = free_addr();
        let _plain = std::net::TcpListener::bind(addr).unwrap();
        let err = Group::new(addr, 1).bind_all(&table(), 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn an_inherited_socket_without_reuseport_is_shared_by_all_workers() {
        let addr = free_addr();
        let fds = table();
        let legacy = std::net::TcpListener::bind(addr).unwrap();
        fds.lock().add(socket_key(addr, 0), legacy.into_raw_fd());
        let keys = Group::new(addr, 2).bind_all(&fds, 1).unwrap();
        assert_eq!(keys, vec![socket_key(addr, 0); 2]);
        assert_eq!(listening(addr), 1);
    }
}
