//! Client disconnects cancel the job (streaming and not), and a graceful shutdown lets an
//! in-flight stream finish.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use crescent_server::ServerConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Send a request and keep the connection open.
async fn open(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = raw_request(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    s.write_all(&req).await.expect("write request");
    s
}

/// Read until `pred` holds on what was received (or EOF); returns everything read.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, pred: impl Fn(&str) -> bool) {
    let mut chunk = [0u8; 8192];
    while !pred(&String::from_utf8_lossy(buf)) {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .expect("read in time")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn long_caption(image_url: &str, stream: bool) -> Value {
    json!({"image_url": image_url, "length": "normal", "stream": stream,
           "settings": {"temperature": 0, "top_p": 1, "max_tokens": 500}})
}

#[test]
fn disconnect_cancels_the_job() {
    let rt = runtime();
    rt.block_on(async {
        let s = TestServer::start(ServerConfig::default(), true).await;
        let a = s.addr;
        // Greedy captions of this image run until the context is full (~290 tokens).
        let img = data_uri("image/png", &image_bytes("rgba_640x480.png"));
        let n_streams = 4;
        let tasks: Vec<_> = (0..n_streams)
            .map(|_| {
                let body = long_caption(&img, true);
                tokio::spawn(async move {
                    let mut c = open(a, "/v1/caption", &body).await;
                    let mut buf = Vec::new();
                    read_until(&mut c, &mut buf, |t| t.contains("data: {\"chunk\"")).await;
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                    assert!(!text.contains("\"completed\""), "still running: {text}");
                    // Dropping the connection after the first chunk.
                    drop(c);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("stream task");
        }
        s.wait_idle().await;

        // A non-streaming request dropped while the engine works on it.
        let img2 = data_uri("image/png", &image_bytes("landscape_800x600.png"));
        let c = open(a, "/v1/caption", &long_caption(&img2, false)).await;
        let mut seen = false;
        for _ in 0..400 {
            if s.engine.stats().await.expect("stats").in_flight > 0 {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen, "the request reached the engine");
        drop(c);
        s.wait_idle().await;

        let m = get(a, "/metrics").await.text();
        let cancelled = metric(
            &m,
            "crescent_requests_total{skill=\"caption\",status=\"cancelled\"}",
        );
        assert_eq!(cancelled, Some(n_streams as f64 + 1.0), "{m}");
        assert_eq!(
            metric(
                &m,
                "crescent_requests_total{skill=\"caption\",status=\"ok\"}"
            ),
            None,
            "{m}"
        );
        assert_eq!(
            metric(&m, "crescent_http_client_disconnects_total"),
            Some(n_streams as f64 + 1.0),
            "{m}"
        );
        assert_eq!(metric(&m, "crescent_http_requests_in_flight"), Some(0.0));
        // Every KV block of the cancelled jobs is back; only the prefix cache holds some.
        s.engine.clear_prefix_cache();
        s.wait_kv_blocks(0).await;
        s.stop().await;
    });
}

#[test]
fn graceful_shutdown_finishes_in_flight_stream() {
    let rt = runtime();
    rt.block_on(async {
        let s = TestServer::start(ServerConfig::default(), true).await;
        let a = s.addr;
        let img = data_uri("image/png", &image_bytes("gray_500x375.png"));
        let mut c = open(a, "/v1/caption", &long_caption(&img, true)).await;
        let mut buf = Vec::new();
        read_until(&mut c, &mut buf, |t| t.contains("data: {\"chunk\"")).await;
        let stop = tokio::spawn(s.stop());
        // The stream still runs to completion.
        read_until(&mut c, &mut buf, |_| false).await;
        let r = parse_response(&buf);
        assert_eq!(r.status, 200);
        let evs: Vec<Value> = r
            .sse_data()
            .iter()
            .map(|d| serde_json::from_str(d).expect("event JSON"))
            .collect();
        let (last, chunks) = evs.split_last().expect("events");
        assert_eq!(last["completed"], true, "{last}");
        let text: String = chunks
            .iter()
            .map(|c| c["chunk"].as_str().expect("chunk"))
            .collect();
        assert_eq!(last["caption"], text);
        tokio::time::timeout(Duration::from_secs(20), stop)
            .await
            .expect("shutdown in time")
            .expect("stop task");
        // No longer accepting connections.
        assert!(TcpStream::connect(a).await.is_err());
    });
}
