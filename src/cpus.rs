//! The CPUs this process may run on, pinning a thread to one of them, and the CPU a
//! connection's packets arrive on (`SO_INCOMING_CPU`), for placing connection threads.
//!
//! Why pin: on a machine where clients and regcache share the cores (the bench's wrk, or a
//! node's kubelet pulling through a local mirror), a connection served on a thread that floats
//! is woken across CPUs, by an inter-processor interrupt, on almost every request. A thread
//! pinned to a CPU and given the connections whose packets arrive on that CPU is woken where
//! its client runs. Measured on a 2-core Firecracker guest, warm manifest by digest, 5 rotated
//! runs each: with wrk -t2 -c8, unpinned 112 500–120 000 req/s, pinned 151 400–174 900, nginx
//! 106 600–140 200; with -c16, unpinned 133 700–148 600, pinned 150 600–195 500, nginx
//! 124 600–147 700. Whether a run paired each client thread with the right CPU was up to the
//! scheduler, which moves the clients; since a connection whose requests arrive on another
//! thread's CPU is asked to reconnect there (`server::Home`), -c16 gives 168 000–198 000
//! against nginx's 122 000–175 000 in the same rounds. With real NICs the
//! incoming CPU is the one that took the packet's interrupt, so the request is served where
//! its bytes are already in cache. Off by default (`[server] pin_threads`): a pinned thread
//! cannot move away from a CPU that other work keeps busy.

use std::io;

/// The CPUs this process may run on (its affinity mask), in order; `None` if unknown.
#[cfg(target_os = "linux")]
pub fn allowed() -> Option<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(not(target_os = "linux"))]
pub fn allowed() -> Option<Vec<usize>> {
    None
}

/// Runs the calling thread on `cpus` only.
#[cfg(target_os = "linux")]
pub fn run_this_thread_on(cpus: &[usize]) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
pub fn run_this_thread_on(_: &[usize]) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The CPU that last took a packet of this socket (on a fresh connection: its handshake).
#[cfg(target_os = "linux")]
pub fn incoming(socket: impl std::os::fd::AsFd) -> Option<usize> {
    rustix::net::sockopt::socket_incoming_cpu(socket)
        .ok()
        .and_then(|c| usize::try_from(c).ok())
}

#[cfg(not(target_os = "linux"))]
pub fn incoming<S>(_: S) -> Option<usize> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_to_one_cpu_reports_that_cpu_alone() {
        let all = allowed().expect("an affinity mask");
        let last = *all.last().unwrap();
        let seen = std::thread::spawn(move || {
            run_this_thread_on(&[last]).unwrap();
            allowed()
        })
        .join()
        .unwrap();
        assert_eq!(seen, Some(vec![last]));
        assert_eq!(allowed(), Some(all), "other threads keep their mask");
    }

    #[test]
    fn a_connection_reports_a_cpu_this_process_may_run_on() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let cpu = incoming(&accepted).expect("SO_INCOMING_CPU");
        assert!(allowed().unwrap().contains(&cpu), "cpu {cpu}");
    }
}
