use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Handle, Socket};

/// A tokio runtime running on its own thread (as a worker's does), and a loop inside its
/// context.
fn start() -> (tokio::runtime::Runtime, Handle) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let relay_loop = Handle::start("test-relay".into(), runtime.handle().clone()).unwrap();
    (runtime, relay_loop)
}

/// A connected pair: the test's blocking end, and the one for the loop (non-blocking).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (far, _) = listener.accept().unwrap();
    far.set_nonblocking(true).unwrap();
    near.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (near, far)
}

#[test]
fn a_socket_on_the_loop_reads_and_writes_until_the_peer_closes() {
    let (_runtime, relay_loop) = start();
    let (mut near, far) = pair();
    let (done, finished) = mpsc::channel();
    relay_loop.spawner().spawn(move || async move {
        let mut socket = Socket::new(far);
        socket.attach().unwrap();
        let mut buf = [0u8; 64];
        let mut total = 0;
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            socket.write_all(&buf[..n]).await.unwrap();
        }
        done.send(total).unwrap();
    });
    for round in 0..100u8 {
        near.write_all(&[round; 10]).unwrap();
        let mut echo = [0u8; 10];
        near.read_exact(&mut echo).unwrap();
        assert_eq!(echo, [round; 10]);
    }
    near.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(1000));
}

#[test]
fn a_task_woken_from_another_thread_and_by_the_runtimes_timer_runs() {
    let (_runtime, relay_loop) = start();
    let (tell, told) = tokio::sync::oneshot::channel::<u32>();
    let (started, waiting) = mpsc::channel();
    let (done, finished) = mpsc::channel();
    relay_loop.spawner().spawn(move || async move {
        // The first wake-up comes from the runtime's timer, the second from this test's thread.
        tokio::time::sleep(Duration::from_millis(20)).await;
        started.send(()).unwrap();
        let got = told.await.unwrap();
        done.send(got).unwrap();
    });
    waiting.recv_timeout(Duration::from_secs(10)).unwrap();
    tell.send(7).unwrap();
    assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(7));
}

#[test]
fn a_socket_that_always_has_data_does_not_keep_other_tasks_waiting() {
    let (_runtime, relay_loop) = start();
    let (mut near, far) = pair();
    // Plenty buffered: a task reading a byte at a time finds data for a long while.
    near.write_all(&vec![1u8; 64 * 1024]).unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let (started, reading) = mpsc::channel();
    let (done, finished) = mpsc::channel();
    {
        let read = read.clone();
        relay_loop.spawner().spawn(move || async move {
            let mut socket = Socket::new(far);
            socket.attach().unwrap();
            let mut byte = [0u8; 1];
            started.send(()).unwrap();
            while read.load(Ordering::Relaxed) < 64 * 1024 {
                socket.read_exact(&mut byte).await.unwrap();
                read.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    reading.recv_timeout(Duration::from_secs(10)).unwrap();
    {
        let read = read.clone();
        relay_loop.spawner().spawn(move || async move {
            done.send(read.load(Ordering::Relaxed)).unwrap();
        });
    }
    let seen = finished.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        seen < 64 * 1024,
        "the second task ran only after {seen} bytes"
    );
}

#[test]
fn stopping_the_loop_drops_its_sessions_on_its_thread() {
    struct Guard(mpsc::Sender<Option<String>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self
                .0
                .send(std::thread::current().name().map(str::to_owned));
        }
    }
    let (_runtime, relay_loop) = start();
    let (dropped, on) = mpsc::channel();
    let (started, running) = mpsc::channel();
    relay_loop.spawner().spawn(move || async move {
        let _guard = Guard(dropped);
        started.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    running.recv_timeout(Duration::from_secs(10)).unwrap();
    drop(relay_loop);
    assert_eq!(
        on.recv_timeout(Duration::from_secs(10)),
        Ok(Some("test-relay".into()))
    );
}

#[test]
fn attaching_off_a_loop_thread_is_an_error() {
    let (_near, far) = pair();
    let mut socket = Socket::new(far);
    assert!(socket.attach().is_err());
}

#[test]
fn the_peers_close_that_comes_with_its_last_data_is_read_too() {
    let (_runtime, relay_loop) = start();
    let (mut near, far) = pair();
    // Both are there before the socket is attached (loopback delivers within the write):
    // one edge for the data and the end.
    near.write_all(b"last words").unwrap();
    drop(near);
    let (done, finished) = mpsc::channel();
    relay_loop.spawner().spawn(move || async move {
        let mut socket = Socket::new(far);
        socket.attach().unwrap();
        // Let the loop take epoll's report of both before the first read.
        tokio::task::yield_now().await;
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        done.send(got).unwrap();
    });
    assert_eq!(
        finished.recv_timeout(Duration::from_secs(10)),
        Ok(b"last words".to_vec())
    );
}

#[test]
fn a_session_that_panics_ends_alone_and_the_loop_goes_on() {
    let (_runtime, relay_loop) = start();
    relay_loop
        .spawner()
        .spawn(|| async { panic!("a bug in one session") });
    let (done, finished) = mpsc::channel();
    relay_loop.spawner().spawn(move || async move {
        tokio::task::yield_now().await;
        done.send(()).unwrap();
    });
    assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(()));
}
