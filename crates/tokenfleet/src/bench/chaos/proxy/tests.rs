use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// An upstream that echoes every connection and reports each peer's address.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (peers_tx, peers) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let _ = peers_tx.send(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, peers)
}

fn fast_lossy() -> FaultProfile {
    FaultProfile {
        delay_mean: Duration::from_millis(20),
        delay_jitter: Duration::from_millis(15),
        // Far above the bench's 5 % so that a short test sees many stalls.
        loss: 0.3,
        rto_min: Duration::from_millis(5),
        rto_max: Duration::from_millis(30),
    }
}

#[tokio::test]
async fn the_proxy_delivers_every_byte_once_and_in_order_under_delay_and_loss() {
    let (upstream, _) = echo_server().await;
    let counters = Arc::new(FaultCounters::default());
    let proxy = FaultProxy::start(upstream, Arc::clone(&counters), 7)
        .await
        .unwrap();
    proxy.set_faults(Some(fast_lossy()));
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let mut rng = StdRng::seed_from_u64(1);
    let sent: Vec<u8> = (0..300_000).map(|_| rng.random()).collect();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(2);
        let mut at = 0;
        while at < to_send.len() {
            let n = rng.random_range(1..20_000).min(to_send.len() - at);
            w.write_all(&to_send[at..at + n]).await.unwrap();
            at += n;
        }
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    // The echo server closes after our FIN: EOF travels through the proxy both ways.
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut echoed))
        .await
        .expect("echo within 60 s")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "bytes reordered or corrupted");
    let c = counters.snapshot();
    assert!(c.delayed_reads > 0 && c.loss_stalls > 0, "{c:?}");
    assert_eq!(c.connections_reset, 0, "{c:?}");
}

#[tokio::test]
async fn a_partition_holds_data_without_closing_and_delivers_it_after_the_heal() {
    let (upstream, _) = echo_server().await;
    let counters = Arc::new(FaultCounters::default());
    let proxy = FaultProxy::start(upstream, Arc::clone(&counters), 7)
        .await
        .unwrap();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 4];
    s.write_all(b"ping").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();

    let partition = Duration::from_millis(400);
    proxy.partition(partition);
    let heals = Instant::now() + partition;
    s.write_all(b"pong").await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut buf))
        .await
        .expect("delivered after the heal")
        .unwrap();
    assert!(Instant::now() >= heals, "delivered during the partition");
    assert_eq!(&buf, b"pong");
    // The same connection carries on.
    s.write_all(b"more").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    let c = counters.snapshot();
    assert_eq!(c.partitions, 1);
    assert!(c.reads_held_by_partition >= 1, "{c:?}");
    assert_eq!(c.connections_reset, 0, "{c:?}");
}

#[tokio::test]
async fn an_address_change_resets_connections_refuses_during_the_gap_and_returns_from_a_new_address(
) {
    let (upstream, mut peers) = echo_server().await;
    let counters = Arc::new(FaultCounters::default());
    let mut proxy = FaultProxy::start(upstream, Arc::clone(&counters), 7)
        .await
        .unwrap();
    let addr = proxy.addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 4];
    s.write_all(b"ping").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    let first = peers.recv().await.unwrap();
    assert_eq!(first.ip(), IpAddr::from(Ipv4Addr::new(127, 0, 0, 1)));

    let gap = Duration::from_secs(2);
    let changing = tokio::spawn(async move {
        proxy.change_address(gap).await.unwrap();
        proxy
    });
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the old connection ends");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "an RST, not an orderly close"
    );
    let refused = TcpStream::connect(addr).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused),
        "the old address is gone during the hand-over"
    );
    let proxy = changing.await.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"back").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"back");
    let second = peers.recv().await.unwrap();
    assert_eq!(second.ip(), IpAddr::from(Ipv4Addr::new(127, 0, 0, 2)));
    let c = counters.snapshot();
    assert_eq!((c.address_changes, c.connections_reset), (1, 1), "{c:?}");
    drop(proxy);
}
