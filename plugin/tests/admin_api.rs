//! Black-box tests of the admin HTTP API: the real router served on 127.0.0.1:0, spoken to
//! by a minimal HTTP/1.1 client over a TCP socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailbell::admin::api;
use mailbell::users::{User, UserStore};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "test-token-0123456789";

struct Server {
    addr: SocketAddr,
    users: UserStore,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(token: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let users = UserStore::open(&dir.path().join("users")).unwrap();
    let app = api::router(users.clone(), Arc::from(token));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        addr,
        users,
        task,
        _dir: dir,
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), reply read to EOF.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(c) = content_type {
            head.push_str(&format!("Content-Type: {c}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("admin API did not answer in time");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

async fn get(s: &Server, path: &str) -> Reply {
    call(s.addr, "GET", path, Some(TOKEN), None, b"").await
}

async fn send_json(s: &Server, method: &str, path: &str, body: &Value) -> Reply {
    let body = serde_json::to_vec(body).unwrap();
    call(
        s.addr,
        method,
        path,
        Some(TOKEN),
        Some("application/json"),
        &body,
    )
    .await
}

async fn import(s: &Server, query: &str, csv: &str) -> Reply {
    let path = format!("/admin/v1/users/import{query}");
    call(
        s.addr,
        "POST",
        &path,
        Some(TOKEN),
        Some("text/csv"),
        csv.as_bytes(),
    )
    .await
}

#[tokio::test]
async fn auth_is_required() {
    let s = start(TOKEN).await;
    s.users.upsert(User::new("alice@example.com")).unwrap();
    let path = "/admin/v1/users/alice@example.com";

    let r = call(s.addr, "GET", path, None, None, b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(r.error().contains("admin token"), "{}", r.error());

    let r = call(s.addr, "GET", path, Some("wrong"), None, b"").await;
    assert_eq!(r.status, 401);
    let r = call(
        s.addr,
        "GET",
        path,
        Some(&TOKEN[..TOKEN.len() - 1]),
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    // Writes and unknown paths are behind the check too.
    let r = call(s.addr, "DELETE", path, Some("wrong"), None, b"").await;
    assert_eq!(r.status, 401);
    assert!(s.users.lookup("alice@example.com").is_some());
    let r = call(s.addr, "GET", "/admin/v1/nothing", None, None, b"").await;
    assert_eq!(r.status, 401);

    let r = get(&s, path).await;
    assert_eq!(r.status, 200);
    let r = get(&s, "/admin/v1/nothing").await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("no such admin endpoint"));
    let r = call(s.addr, "POST", path, Some(TOKEN), None, b"").await;
    assert_eq!(r.status, 405);
    assert!(!r.error().is_empty());
}

#[tokio::test]
async fn empty_token_disables_the_api() {
    let s = start("").await;
    for token in [None, Some(""), Some("anything")] {
        let r = call(s.addr, "GET", "/admin/v1/users", token, None, b"").await;
        assert_eq!(r.status, 403, "{token:?}");
        assert!(
            r.error().contains("admin token is not configured"),
            "{}",
            r.error()
        );
    }
}

#[tokio::test]
async fn crud_and_patch() {
    let s = start(TOKEN).await;

    // Create (address taken from the path, normalised).
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/Alice@Example.com",
        &json!({"phone": "+44 7700 900123", "aliases": ["Ali@Example.com"], "quiet": "22:00-07:00"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let u = r.json();
    assert_eq!(u["address"], "alice@example.com");
    assert_eq!(u["phone"], "+447700900123");
    assert_eq!(u["notify"], true);
    assert_eq!(u["aliases"], json!(["ali@example.com"]));
    assert_eq!(u["quiet"], json!({"start_min": 1320, "end_min": 420}));

    // Replace: 200, and the full body wins (no aliases now).
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/alice@example.com",
        &json!({"address": "ALICE@example.com", "phone": "+447700900123", "language": "en"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["aliases"], json!([]));
    assert!(s.users.lookup("ali@example.com").is_none());

    // Validation and conflicts.
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/bob@example.com",
        &json!({"phone": "0044"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("must start with '+'"), "{}", r.error());
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/bob@example.com",
        &json!({"address": "carol@example.com"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("differs"), "{}", r.error());
    let r = send_json(&s, "PUT", "/admin/v1/users/not-an-address", &json!({})).await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("no '@'"), "{}", r.error());
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/bob@example.com",
        &json!({"aliases": ["alice@example.com"]}),
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("alice@example.com"), "{}", r.error());
    let r = call(
        s.addr,
        "PUT",
        "/admin/v1/users/bob@example.com",
        Some(TOKEN),
        Some("application/json"),
        b"{not json",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send_json(&s, "PUT", "/admin/v1/users/bob@example.com", &json!({})).await;
    assert_eq!(r.status, 201);

    // Read, also by alias and percent-encoded.
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/bob@example.com",
        &json!({"add_aliases": ["Robert@Example.com"]}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(&s, "/admin/v1/users/ROBERT%40example.com").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["address"], "bob@example.com");

    // Patch toggles notify, and the hot-path lookup sees it at once.
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"notify": false}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["notify"], false);
    assert!(!s.users.lookup("alice@example.com").unwrap().notify);
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"notify": true, "licence_until": 1767225600000_i64, "rate_limit_secs": 60}),
    )
    .await;
    assert_eq!(r.status, 200);
    let u = r.json();
    assert_eq!(
        (u["notify"].clone(), u["licence_until"].clone()),
        (json!(true), json!(1767225600000_i64))
    );
    assert_eq!(u["phone"], "+447700900123"); // untouched
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"licence_until": null}),
    )
    .await;
    assert_eq!(r.json()["licence_until"], Value::Null);
    assert_eq!(r.json()["rate_limit_secs"], 60);
    // Account state and networks (the retrieval proxy's gate), by PUT and PATCH; a bad value
    // names the field.
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/carol@example.com",
        &json!({"notify": false, "state": "unwelcome", "networks": ["192.0.2.7"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.error());
    assert_eq!(r.json()["networks"], json!(["192.0.2.7/32"]));
    let r = send_json(
        &s,
        "PUT",
        "/admin/v1/users/carol@example.com",
        &json!({"notify": false, "networks": ["192.0.2.7/40"]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("networks"), "{}", r.error());
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"state": "arrears", "networks": ["10.1.2.3/8", "2001:db8::/32"]}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "arrears");
    assert_eq!(r.json()["networks"], json!(["10.0.0.0/8", "2001:db8::/32"]));
    let alice = s.users.lookup("alice@example.com").unwrap();
    assert!(alice.networks.allows("10.9.9.9".parse().unwrap()));
    for (body, want) in [
        (json!({"state": "banned"}), "banned"),
        (json!({"networks": ["10.0.0.0/33"]}), "10.0.0.0/33"),
    ] {
        let r = send_json(&s, "PATCH", "/admin/v1/users/alice@example.com", &body).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(r.error().contains(want), "{}", r.error());
    }
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"state": "normal", "networks": []}),
    )
    .await;
    assert_eq!(
        (r.json()["state"].clone(), r.json()["networks"].clone()),
        (json!("normal"), json!([]))
    );
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"notfy": false}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("notfy"), "{}", r.error());
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/alice@example.com",
        &json!({"quiet": "9-5"}),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send_json(
        &s,
        "PATCH",
        "/admin/v1/users/nobody@example.com",
        &json!({"notify": true}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(
        r.error().contains("no such user nobody@example.com"),
        "{}",
        r.error()
    );

    // List, paged.
    for name in ["carol", "dave", "erin"] {
        s.users
            .upsert(User::new(&format!("{name}@example.com")))
            .unwrap();
    }
    let r = get(&s, "/admin/v1/users?limit=2").await;
    assert_eq!(r.status, 200);
    let page = r.json();
    let names: Vec<_> = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["alice@example.com", "bob@example.com"]);
    assert_eq!(page["next"], "bob@example.com");
    let r = get(&s, "/admin/v1/users?after=dave@example.com&limit=2").await;
    let page = r.json();
    assert_eq!(page["users"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], Value::Null);
    let r = get(&s, "/admin/v1/users?limit=lots").await;
    assert_eq!(r.status, 400);
    let r = get(&s, "/admin/v1/users?limit=0").await;
    assert_eq!(r.status, 400);

    // Delete: by alias refused, by address 204, then 404.
    let r = call(
        s.addr,
        "DELETE",
        "/admin/v1/users/robert@example.com",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.error().contains("alias of bob@example.com"),
        "{}",
        r.error()
    );
    let r = call(
        s.addr,
        "DELETE",
        "/admin/v1/users/Bob@example.com",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(s.users.lookup("robert@example.com").is_none());
    let r = call(
        s.addr,
        "DELETE",
        "/admin/v1/users/bob@example.com",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
    let r = get(&s, "/admin/v1/users/bob@example.com").await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("bob@example.com"));
}

#[tokio::test]
async fn import_reports_bad_lines() {
    let s = start(TOKEN).await;
    s.users.upsert(User::new("old@example.com")).unwrap();
    let csv = "address,phone,notify,aliases\n\
               a@example.com,+447700900001,yes,a1@example.com;a2@example.com\n\
               b@example.com,not a phone,yes,\n\
               c@example.com,+447700900003,no,\n\
               old@example.com,+447700900004,,\n";
    let r = import(&s, "", csv).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let report = r.json();
    assert_eq!(report["added"], 2);
    assert_eq!(report["updated"], 1);
    assert_eq!(report["failed"], 1);
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0][0], 3);
    assert!(
        errors[0][1].as_str().unwrap().contains("phone"),
        "{errors:?}"
    );
    assert_eq!(
        s.users.lookup("A2@example.com").unwrap().address,
        "a@example.com"
    );
    assert!(s.users.lookup("b@example.com").is_none());
    assert!(!s.users.lookup("c@example.com").unwrap().notify);

    // Add-only leaves existing users alone.
    let r = import(
        &s,
        "?mode=add",
        "address,notify\nc@example.com,yes\nd@example.com,yes\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let report = r.json();
    assert_eq!(
        (report["added"].clone(), report["skipped"].clone()),
        (json!(1), json!(1))
    );
    assert!(!s.users.lookup("c@example.com").unwrap().notify);

    let r = import(&s, "?mode=merge", "address\n").await;
    assert_eq!(r.status, 400);
    assert!(
        r.error().contains("expected upsert or add"),
        "{}",
        r.error()
    );
    let r = import(&s, "", "address,colour\nx@example.com,red\n").await;
    assert_eq!(r.status, 400);
    assert!(
        r.error().contains("unknown column \"colour\""),
        "{}",
        r.error()
    );
    assert!(s.users.lookup("x@example.com").is_none());
}
