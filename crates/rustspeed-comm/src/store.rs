//! A small TCP key/value store hosted by rank 0, for rendezvous (the shared-memory file's name,
//! later NCCL unique ids), like torch's `TCPStore`. Requests are tiny and rare, so it is one
//! thread per connection and one mutex.
//!
//! Wire format (little endian): request `op:u8, key_len:u32, key, arg_len:u32, arg`, reply
//! `status:u8, len:u32, payload`. `status` 0 = ok, 1 = timed out.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CommError, ErrorKind, Result};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT_GE: u8 = 4;
const OP_CHECK: u8 = 5;

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The server half, owned by rank 0. Dropping it stops accepting new connections.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` ("0.0.0.0:29500"; port 0 picks a free one, see `port()`).
    pub fn bind(addr: &str) -> Result<StoreServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AddrInUse {
                " (another job or a stale process holds it; pick another with --master-port or MASTER_PORT)"
            } else {
                ""
            };
            CommError::setup(format!(
                "rendezvous store: cannot listen on {addr}: {e}{hint}"
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| CommError::setup(format!("rendezvous store: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::setup(format!("rendezvous store: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rustspeed-store".into())
            .spawn(move || accept_loop(listener, table, stop2))
            .map_err(|e| CommError::setup(format!("rendezvous store: cannot spawn thread: {e}")))?;
        Ok(StoreServer {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, table: Arc<Table>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let table = table.clone();
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                // Connection threads end when their client disconnects.
                let _ = std::thread::Builder::new()
                    .name("rustspeed-store-conn".into())
                    .spawn(move || {
                        let _ = serve(stream, &table);
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn read_bytes(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_reply(s: &mut TcpStream, status: u8, payload: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(5 + payload.len());
    msg.push(status);
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg)
}

fn counter(v: Option<&Vec<u8>>) -> i64 {
    v.and_then(|b| b.as_slice().try_into().ok())
        .map(i64::from_le_bytes)
        .unwrap_or(0)
}

fn serve(mut s: TcpStream, table: &Table) -> io::Result<()> {
    loop {
        let mut op = [0u8; 1];
        if s.read_exact(&mut op).is_err() {
            return Ok(()); // client went away
        }
        let key = String::from_utf8_lossy(&read_bytes(&mut s)?).into_owned();
        let arg = read_bytes(&mut s)?;
        match op[0] {
            OP_SET => {
                table.map.lock().unwrap().insert(key, arg);
                table.changed.notify_all();
                write_reply(&mut s, 0, &[])?;
            }
            OP_ADD => {
                let delta = i64::from_le_bytes(arg.as_slice().try_into().unwrap_or([0; 8]));
                let mut map = table.map.lock().unwrap();
                let v = counter(map.get(&key)) + delta;
                map.insert(key, v.to_le_bytes().to_vec());
                drop(map);
                table.changed.notify_all();
                write_reply(&mut s, 0, &v.to_le_bytes())?;
            }
            OP_CHECK => {
                let present = table.map.lock().unwrap().contains_key(&key);
                write_reply(&mut s, 0, &[present as u8])?;
            }
            OP_GET | OP_WAIT_GE => {
                let timeout_ms = u64::from_le_bytes(arg[..8].try_into().unwrap_or([0; 8]));
                let target = if op[0] == OP_WAIT_GE {
                    i64::from_le_bytes(arg[8..16].try_into().unwrap_or([0; 8]))
                } else {
                    0
                };
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                let mut map = table.map.lock().unwrap();
                let reply = loop {
                    let done = match op[0] {
                        OP_GET => map.get(&key).cloned(),
                        _ => {
                            let v = counter(map.get(&key));
                            (v >= target).then(|| v.to_le_bytes().to_vec())
                        }
                    };
                    if let Some(v) = done {
                        break Some(v);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break None;
                    }
                    map = table.changed.wait_timeout(map, deadline - now).unwrap().0;
                };
                drop(map);
                match reply {
                    Some(v) => write_reply(&mut s, 0, &v)?,
                    None => write_reply(&mut s, 1, &[])?,
                }
            }
            _ => return Ok(()),
        }
    }
}

/// A client of the store (every rank, rank 0 included, talks to it over TCP). Rank 0 also
/// owns the server, kept alive as long as this client.
pub struct Store {
    stream: Mutex<TcpStream>,
    addr: String,
    timeout: Duration,
    _server: Option<StoreServer>,
}

impl Store {
    /// Connects to `host:port`, retrying until `timeout` (rank 0 may start after the others).
    /// With `serve = true` this process first starts the server there (rank 0).
    pub fn connect(host: &str, port: u16, serve: bool, timeout: Duration) -> Result<Store> {
        let server = if serve {
            Some(StoreServer::bind(&format!("0.0.0.0:{port}"))?)
        } else {
            None
        };
        let port = server.as_ref().map_or(port, |s| s.port());
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut last_err = String::new();
        let stream = loop {
            match addr.to_socket_addrs() {
                Ok(addrs) => {
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                return Ok(Store {
                                    stream: Mutex::new(s),
                                    addr,
                                    timeout,
                                    _server: server,
                                });
                            }
                            Err(e) => last_err = e.to_string(),
                        }
                    }
                }
                Err(e) => last_err = format!("cannot resolve: {e}"),
            }
            if Instant::now() >= deadline {
                break last_err;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Err(CommError::setup(format!(
            "could not reach the rendezvous store at {addr} (MASTER_ADDR:MASTER_PORT) within {:.0}s: {stream}; \
             is rank 0 running, and do all ranks use the same MASTER_ADDR and MASTER_PORT?",
            timeout.as_secs_f64()
        )))
    }

    /// Another client of the same store (a connection of its own, e.g. for a second thread).
    pub fn reconnect(&self) -> Result<Store> {
        let (host, port) = self.addr.rsplit_once(':').unwrap_or((&self.addr, "0"));
        Store::connect(host, port.parse().unwrap_or(0), false, self.timeout)
    }

    /// Starts a server on a free local port and connects to it (tests, single-machine tools).
    pub fn local_server(timeout: Duration) -> Result<Store> {
        Self::connect("127.0.0.1", 0, true, timeout)
    }

    /// The port clients should connect to.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(&self, op: u8, key: &str, arg: &[u8]) -> Result<(u8, Vec<u8>)> {
        let io_err = |e: io::Error| {
            CommError::new(
                ErrorKind::PeerDied,
                format!(
                    "rendezvous store at {}: connection lost ({e}); did rank 0 exit?",
                    self.addr
                ),
            )
        };
        let mut s = self.stream.lock().unwrap();
        let mut msg = Vec::with_capacity(9 + key.len() + arg.len());
        msg.push(op);
        msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
        msg.extend_from_slice(key.as_bytes());
        msg.extend_from_slice(&(arg.len() as u32).to_le_bytes());
        msg.extend_from_slice(arg);
        s.write_all(&msg).map_err(io_err)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(io_err)?;
        let payload = read_bytes(&mut s).map_err(io_err)?;
        Ok((status[0], payload))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.request(OP_SET, key, value).map(|_| ())
    }

    /// Waits (up to the store's timeout) until `key` is set and returns its value.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let arg = (self.timeout.as_millis() as u64).to_le_bytes();
        match self.request(OP_GET, key, &arg)? {
            (0, v) => Ok(v),
            _ => Err(CommError::new(
                ErrorKind::Timeout,
                format!(
                    "rendezvous store at {}: key '{key}' was not set within {:.0}s (a rank did not start, or ranks disagree on WORLD_SIZE)",
                    self.addr,
                    self.timeout.as_secs_f64()
                ),
            )),
        }
    }

    /// Waits (up to the store's timeout) until every key in `keys` is set (torch's
    /// `store.wait(keys)`).
    pub fn wait(&self, keys: &[&str]) -> Result<()> {
        for k in keys {
            self.get(k)?;
        }
        Ok(())
    }

    /// Adds `delta` to the integer counter at `key` (absent = 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let (_, v) = self.request(OP_ADD, key, &delta.to_le_bytes())?;
        Ok(i64::from_le_bytes(
            v.as_slice().try_into().unwrap_or([0; 8]),
        ))
    }

    /// Whether `key` is set, without waiting.
    pub fn check(&self, key: &str) -> Result<bool> {
        Ok(self.request(OP_CHECK, key, &[])?.1 == [1])
    }

    /// Waits until the counter at `key` reaches `target` (a store barrier); `what` names the
    /// wait in the timeout message.
    pub fn wait_ge(&self, key: &str, target: i64, what: &str) -> Result<i64> {
        let mut arg = (self.timeout.as_millis() as u64).to_le_bytes().to_vec();
        arg.extend_from_slice(&target.to_le_bytes());
        match self.request(OP_WAIT_GE, key, &arg)? {
            (0, v) => Ok(i64::from_le_bytes(
                v.as_slice().try_into().unwrap_or([0; 8]),
            )),
            _ => {
                let now = self.add(key, 0).unwrap_or(-1);
                Err(CommError::new(
                    ErrorKind::Timeout,
                    format!(
                        "rendezvous: {what}: only {now} of {target} ranks arrived within {:.0}s (store {}, key '{key}')",
                        self.timeout.as_secs_f64(),
                        self.addr
                    ),
                ))
            }
        }
    }
}
