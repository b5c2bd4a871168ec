//! The style picture's fetch against hostile URLs (the address forms and redirects of an SSRF
//! probe), its cache's bounds, and fetches of different URLs beside each other.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use super::*;

/// A small PNG (16×8) to serve.
fn png() -> Vec<u8> {
    let picture = image::RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 16, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

/// What a test server answers a request for a path with.
enum Answer {
    Picture,
    Redirect(String),
    /// 200 with a body that is no picture.
    NotPicture,
    /// Takes the connection and says nothing until the test says so.
    Hold(mpsc::Receiver<()>),
}

/// Serves on 127.0.0.1 until the test ends: one thread per connection, `route` deciding each
/// answer; counts connections.
fn serve(route: impl Fn(&str) -> Answer + Send + Sync + 'static) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let route = Arc::new(route);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let route = route.clone();
            thread::spawn(move || answer(conn, &*route));
        }
    });
    (addr, count)
}

fn answer(mut conn: TcpStream, route: &dyn Fn(&str) -> Answer) {
    let mut line = String::new();
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The rest of the head.
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return,
            Ok(_) if header == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    match route(&path) {
        Answer::Picture => {
            let body = png();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
        Answer::Redirect(to) => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = conn.write_all(head.as_bytes());
        }
        Answer::NotPicture => {
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nnot a picture",
            );
        }
        Answer::Hold(release) => {
            let _ = release.recv();
        }
    }
}

fn expect_refused(url: &str, policy: OutboundPolicy) -> String {
    match fetch_http(url, policy) {
        Err(Failure::Refused(why)) => why,
        Err(Failure::Failed(why)) => panic!("{url}: attempted and failed ({why}), not refused"),
        Ok(picture) => panic!(
            "{url}: fetched a {}×{} picture",
            picture.width, picture.height
        ),
    }
}

#[test]
fn every_inward_address_form_and_redirect_is_refused_with_one_client_message() {
    // A server that would answer every probe with a picture: without the policy each loopback
    // form below would fetch it.
    let (target, _) = serve(|_| Answer::Picture);
    let port = target.port();
    // The first hop of the redirect cases: let through by an exact exception, so that what
    // refuses them is the check on where they redirect to.
    let (first, _) = serve(move |path| match path {
        "/to-loopback" => Answer::Redirect(format!("http://127.0.0.1:{port}/s.png")),
        "/to-localhost" => Answer::Redirect(format!("http://localhost:{port}/s.png")),
        "/to-metadata" => Answer::Redirect("http://169.254.169.254/latest/meta-data/".into()),
        "/to-file" => Answer::Redirect("file:///etc/passwd".into()),
        "/to-ftp" => Answer::Redirect("ftp://example.com/s.png".into()),
        "/to-userinfo" => Answer::Redirect(format!("http://user:secret@127.0.0.1:{port}/")),
        "/loop" => Answer::Redirect("/loop".into()),
        _ => Answer::Picture,
    });
    let public = OutboundPolicy::public_only();
    let excepted = public.with_exception(first);
    let f = first.port();
    let direct = [
        format!("http://127.0.0.1:{port}/s.png"),
        format!("http://localhost:{port}/s.png"),
        format!("http://127.1:{port}/s.png"),
        format!("http://2130706433:{port}/s.png"),
        format!("http://0x7f000001:{port}/s.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/s.png"),
        format!("http://[::1]:{port}/s.png"),
        format!("https://127.0.0.1:{port}/s.png"),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://10.0.0.1/s.png".into(),
        "http://192.168.0.1/s.png".into(),
        "http://[fd00::1]/s.png".into(),
        "http://[fe80::1]/s.png".into(),
        format!("http://0.0.0.0:{port}/s.png"),
        "http://user:secret@example.com/s.png".into(),
    ];
    let redirected = [
        format!("http://127.0.0.1:{f}/to-loopback"),
        format!("http://127.0.0.1:{f}/to-localhost"),
        format!("http://127.0.0.1:{f}/to-metadata"),
        format!("http://127.0.0.1:{f}/to-file"),
        format!("http://127.0.0.1:{f}/to-ftp"),
        format!("http://127.0.0.1:{f}/to-userinfo"),
        format!("http://127.0.0.1:{f}/loop"),
    ];
    let cases: Vec<(&str, OutboundPolicy)> = direct
        .iter()
        .map(|u| (u.as_str(), public))
        .chain(redirected.iter().map(|u| (u.as_str(), excepted)))
        .collect();
    println!("{:<52} | refused because", "URL tried");
    println!("{}", "-".repeat(120));
    let mut client_messages = std::collections::BTreeSet::new();
    for (url, policy) in &cases {
        let why = expect_refused(url, *policy);
        println!("{url:<52} | {why}");
        let err = fetch(
            url,
            FetchPolicy {
                outbound: *policy,
                allow_files: false,
            },
        )
        .expect_err(url);
        assert!(
            matches!(&err, Error::InvalidParam { field, .. } if field == FIELD),
            "{url}: {err}"
        );
        client_messages.insert(err.to_string());
    }
    assert_eq!(cases.len(), 22);
    // Each redirect case was refused on its second hop: the first was let through.
    let redirect_reasons: Vec<String> = redirected
        .iter()
        .map(|u| expect_refused(u, excepted))
        .collect();
    for (url, why) in redirected.iter().zip(&redirect_reasons) {
        assert!(
            !why.starts_with(&format!("http://127.0.0.1:{f}/")),
            "{url}: the first hop itself was refused: {why}"
        );
    }
    assert!(redirect_reasons[6].contains("more than 5 redirects"));
    // A fetch that is attempted and fails reads the same as one refused: a port with nothing
    // behind it, a 404-like answer that is not a picture, a name that does not resolve.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (not_a_picture, _) = serve(|_| Answer::NotPicture);
    let lan = OutboundPolicy::with_private_network();
    for url in [
        format!("http://{closed}/s.png"),
        format!("http://{not_a_picture}/s.png"),
        "http://no-such-host.invalid/s.png".into(),
    ] {
        let failure = fetch_http(&url, lan).expect_err(&url);
        println!("{url:<52} | (attempted) {failure}");
        assert!(matches!(failure, Failure::Failed(_)), "{url}: {failure}");
        let err = fetch(
            &url,
            FetchPolicy {
                outbound: lan,
                allow_files: false,
            },
        )
        .expect_err(&url);
        client_messages.insert(err.to_string());
    }
    assert_eq!(
        client_messages.into_iter().collect::<Vec<_>>(),
        vec![format!("invalid parameter `{FIELD}`: {NOT_FETCHED}")],
        "one message for every failure"
    );

    // With the LAN flag, the same loopback picture is fetched, directly and through a redirect.
    let lan_policy = FetchPolicy {
        outbound: lan,
        allow_files: false,
    };
    for url in [
        format!("http://127.0.0.1:{port}/s.png"),
        format!("http://127.1:{port}/s.png"),
        format!("http://127.0.0.1:{f}/to-loopback"),
    ] {
        let picture = fetch(&url, lan_policy).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!((picture.width, picture.height), (16, 8), "{url}");
    }
    // Link-local stays refused even then.
    let why = expect_refused("http://169.254.169.254/latest/meta-data/", lan);
    assert!(why.contains("link-local"), "{why}");
}

#[test]
fn the_cache_holds_its_byte_bound_and_evicts_the_oldest() {
    let mut cache = StyleCache::new(CACHE_ENTRIES, CACHE_BYTES);
    // 12 MiB pictures: five fit in 64 MiB, well under the eight entries.
    let (w, h) = (4096, 1024);
    let picture = || StyleImage::from_rgb(vec![0; w * h * 3], w, h).unwrap();
    let mut most = 0;
    for i in 0..8 {
        cache.insert(format!("url-{i}"), picture());
        most = most.max(cache.bytes());
        assert!(cache.bytes() <= CACHE_BYTES, "after {i}: {}", cache.bytes());
    }
    println!(
        "8 pictures of {} bytes: {} kept, {} bytes, {} evicted (bound {CACHE_BYTES} bytes, \
         {CACHE_ENTRIES} entries)",
        w * h * 3,
        cache.len(),
        cache.bytes(),
        cache.evicted()
    );
    assert_eq!(cache.len(), 5);
    assert_eq!(cache.evicted(), 3);
    assert_eq!(cache.bytes(), 5 * (w * h * 3 + "url-0".len()));
    assert!(most <= CACHE_BYTES);
    // The oldest went first; a use makes an entry the newest.
    assert!(cache.get("url-2").is_none() && cache.get("url-3").is_some());
    cache.insert("url-8".into(), picture());
    assert!(cache.get("url-4").is_none() && cache.get("url-3").is_some());
    // One picture over the whole bound is not kept (and evicts nothing).
    let side = CACHE_BYTES / 3 + 1;
    let huge = StyleImage::from_rgb(vec![0; side * 3], side, 1).unwrap();
    let before = (cache.len(), cache.evicted());
    cache.insert("huge".into(), huge);
    assert_eq!((cache.len(), cache.evicted()), before);
    assert!(cache.get("huge").is_none());
    // The entry bound still holds for small pictures.
    let mut small = StyleCache::new(CACHE_ENTRIES, CACHE_BYTES);
    for i in 0..20 {
        small.insert(
            format!("s-{i}"),
            StyleImage::from_rgb(vec![0; 3], 1, 1).unwrap(),
        );
    }
    assert_eq!((small.len(), small.evicted()), (CACHE_ENTRIES, 12));
}

#[test]
fn a_slow_url_does_not_hold_up_another_and_one_url_is_fetched_once() {
    let (release, held) = mpsc::channel::<()>();
    let held = std::sync::Mutex::new(Some(held));
    let (accepted_tx, accepted) = mpsc::channel::<()>();
    let accepted_tx = std::sync::Mutex::new(accepted_tx);
    let (slow, _) = serve(move |_| {
        let _ = accepted_tx.lock().unwrap().send(());
        match held.lock().unwrap().take() {
            Some(rx) => Answer::Hold(rx),
            None => Answer::Picture,
        }
    });
    let (fast, fast_count) = serve(|_| Answer::Picture);
    let policy = FetchPolicy {
        outbound: OutboundPolicy::with_private_network(),
        allow_files: false,
    };
    let slow_url = format!("http://{slow}/slow.png");
    let (slow_done_tx, slow_done) = mpsc::channel();
    let slow_fetch = {
        let url = slow_url.clone();
        thread::spawn(move || {
            let outcome = fetch_cached(&url, policy);
            let _ = slow_done_tx.send(());
            outcome
        })
    };
    // The slow server has the first request and holds it.
    accepted.recv().expect("the slow fetch connected");
    // Another URL meanwhile: fetched while the slow one still waits for its answer.
    let fast_url = format!("http://{fast}/fast.png");
    let picture = fetch_cached(&fast_url, policy).expect("the fast URL");
    assert_eq!((picture.width, picture.height), (16, 8));
    assert!(
        slow_done.try_recv().is_err() && !slow_fetch.is_finished(),
        "the slow fetch ended first"
    );
    // Three more callers of the fast URL at once: the cache answers them, no new request.
    let again: Vec<_> = (0..3)
        .map(|_| {
            let url = fast_url.clone();
            thread::spawn(move || fetch_cached(&url, policy).map(|p| p.width))
        })
        .collect();
    for caller in again {
        assert_eq!(caller.join().unwrap().expect("cached"), 16);
    }
    assert_eq!(fast_count.load(Ordering::SeqCst), 1);
    // A second caller of the slow URL joins its fetch rather than making another request.
    let joined = {
        let url = slow_url.clone();
        thread::spawn(move || fetch_cached(&url, policy))
    };
    // It waits on the flight (the list and the leader hold the other two references).
    let key = cache_key(&slow_url, policy);
    let waiters = || {
        lock(&FLIGHTS)
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, flight)| Arc::strong_count(flight))
    };
    while waiters() < 3 {
        assert!(!joined.is_finished(), "the second caller did not wait");
        thread::yield_now();
    }
    release.send(()).expect("release");
    let first = slow_fetch.join().expect("no panic");
    let second = joined.join().expect("no panic");
    // The held connection closed without an answer: both read the one client message.
    let expected = format!("invalid parameter `{FIELD}`: {NOT_FETCHED}");
    assert_eq!(first.expect_err("no answer").to_string(), expected);
    assert_eq!(second.expect_err("the same outcome").to_string(), expected);
    // Nothing is left in flight.
    assert!(lock(&FLIGHTS).iter().all(|(k, _)| !k.contains(&slow_url)));
}

#[test]
fn the_log_shows_no_credentials_or_query() {
    assert_eq!(
        loggable("http://user:secret@example.com/a.png?token=abc"),
        "http://example.com/a.png"
    );
    assert_eq!(loggable("not a url"), "(not a URL)");
    assert_eq!(
        loggable(&format!("http://e.com/{}", "a".repeat(500))).len(),
        200
    );
}
