//! The web console in a real browser: Debian's headless Chromium driven
//! through chromedriver (WebDriver, fantoccini). With auth on: log in (a
//! wrong secret is refused), see a topic's lag drop after a consume,
//! redrive a dead letter and see it delivered, commit a given-up half and
//! see it delivered, see `<script>` in a body, a key and a nack reason
//! rendered as text, and forms refused without the session's CSRF token.
//! A screenshot of each page is saved under the test's temp dir (or
//! `HALFMQ_CONSOLE_SHOTS`, when set).
//!
//! Without `/usr/bin/chromium` and `/usr/bin/chromedriver` (packages
//! `chromium`, `chromium-driver`) the test says so and passes, unless
//! `HALFMQ_CONSOLE_REQUIRED=1` (CI sets it after installing them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use halfmq_client::{
    Client, ClientOptions, Consumer, Credentials, Message, Producer, Rule, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, test_config};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const SECRET: &str = "the console admin secret";
const APP_SECRET: &str = "the application's secret";
const XSS_BODY: &str = "<script>window.__pwned = 1</script>";
const XSS_REASON: &str = "<img src=x onerror=\"window.__pwned = 2\">";

/// chromedriver in a process group of its own, which is killed on drop
/// with the Chromium it started (also when the test fails half-way).
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_driver() -> Driver {
    let port = free_port();
    use std::os::unix::process::CommandExt as _;
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let d = Driver(child, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

async fn browser(driver: &Driver, profile: &Path) -> Browser {
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Saves a screenshot of the page as `name`.png in `dir`.
async fn shot(b: &Browser, dir: &Path, name: &str) {
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The element `css`, waiting for it a while (a page may still be loading).
async fn find(b: &Browser, css: &str) -> fantoccini::elements::Element {
    match b
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => panic!(
            "no {css} on {:?}: {e}\n{}",
            b.current_url().await.map(|u| u.to_string()),
            b.source().await.unwrap_or_default()
        ),
    }
}

async fn text(b: &Browser, css: &str) -> String {
    find(b, css).await.text().await.unwrap()
}

/// Clicks `css` on the page (a link or a form's button).
async fn click(b: &Browser, css: &str) {
    find(b, css).await.click().await.unwrap();
}

/// Fills the login form and submits it.
async fn log_in(b: &Browser, user: &str, secret: &str) {
    find(b, "#user").await.send_keys(user).await.unwrap();
    find(b, "#secret").await.send_keys(secret).await.unwrap();
    click(b, "#login").await;
}

/// Waits until the browser is at `path` (a click's navigation may still
/// be under way).
async fn wait_path(b: &Browser, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = b.current_url().await.unwrap();
        if now.path() == path {
            return;
        }
        assert!(Instant::now() < deadline, "at {now}, not {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `css` holds `want` (the next page may still be loading).
async fn wait_text(b: &Browser, css: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The element may go stale under us while the next page loads.
        let got = match b.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if got.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{css} is {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A console request with the session cookie `cookie` and a form body:
/// (status, response head, body).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> (u16, String, String) {
    let mut headers = vec!["Content-Type: application/x-www-form-urlencoded".to_owned()];
    headers.extend(cookie.map(|c| format!("Cookie: halfmq_session={c}")));
    halfmq_tests::http_request(addr, method, path, &headers, form)
}

/// A form post: (status, Location header).
fn post(addr: SocketAddr, path: &str, cookie: Option<&str>, form: &str) -> (u16, String) {
    let (status, head, _) = request(addr, "POST", path, cookie, form);
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap_or("")
        .to_owned();
    (status, location)
}

fn have_chromium() -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        assert!(
            std::env::var("HALFMQ_CONSOLE_REQUIRED").as_deref() != Ok("1"),
            "HALFMQ_CONSOLE_REQUIRED=1 but {CHROMIUM} or {CHROMEDRIVER} is missing"
        );
        eprintln!(
            "SKIPPED: the console browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        );
    }
    ok
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_steers_the_broker_from_the_console() {
    if !have_chromium() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shots: PathBuf = std::env::var_os("HALFMQ_CONSOLE_SHOTS")
        .map_or_else(|| dir.path().join("screenshots"), PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.auth.enabled = true;
    cfg.auth.admin_secret = Some(halfmq_broker::auth::config::SecretString::new(SECRET));
    cfg.transaction_timeout_ms = 100;
    cfg.check_interval_ms = 100;
    cfg.check_max = 2;
    cfg.max_reconsume_times = 1;
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let base = format!("http://{http}");
    let connect = |user: &'static str, secret: &'static str| {
        let addr = b.addr.to_string();
        async move {
            Client::connect_with(
                &addr,
                ClientOptions {
                    credentials: Some(Credentials::new(user, secret)),
                    ..ClientOptions::default()
                },
            )
            .await
            .unwrap()
        }
    };
    // The application's user; the console's is the admin.
    let sec = halfmq_client::Security::new(connect("admin", SECRET).await);
    sec.create_user_with_secret("app", APP_SECRET)
        .await
        .unwrap();
    for rule in [
        Rule::topic("*", &["pub", "sub"]),
        Rule::group("*", &["sub"]),
        Rule::producer_group("*", &["tx"]),
    ] {
        sec.grant("app", &rule).await.unwrap();
    }
    let c = connect("app", APP_SECRET).await;

    // Anonymous requests are sent to the login page; forms are refused.
    let (code, location) = tokio::task::spawn_blocking(move || {
        post(http, "/actions/purge", None, "group=dg&confirm=yes")
    })
    .await
    .unwrap();
    assert_eq!((code, location.as_str()), (303, "/login"));

    let driver = start_driver();
    let web = browser(&driver, &dir.path().join("profile")).await;
    web.goto(&base).await.unwrap();
    wait_path(&web, "/login").await;
    shot(&web, &shots, "login").await;
    log_in(&web, "admin", "not the secret").await;
    assert!(text(&web, ".error").await.contains("wrong secret"));
    log_in(&web, "admin", SECRET).await;
    wait_path(&web, "/").await;
    wait_text(&web, "h1", "Overview").await;
    shot(&web, &shots, "overview").await;

    // Lag drops after a consume.
    let p = Producer::new(c.clone());
    for i in 0..4 {
        p.send(Message::new("orders", format!("order {i}")))
            .await
            .unwrap();
    }
    let billing = Consumer::new(c.clone(), "billing", "orders");
    let first = billing.receive(1, Duration::from_secs(2)).await.unwrap();
    for m in &first {
        billing.ack(m).await.unwrap();
    }
    let lag_cell = "tr[data-group='billing'][data-topic='orders'] td.lag";
    web.goto(&format!("{base}/groups")).await.unwrap();
    let before: u64 = text(&web, lag_cell).await.parse().unwrap();
    assert_eq!(before, 4 - first.len() as u64);
    let mut acked = first.len();
    while acked < 4 {
        for m in billing.receive(4, Duration::from_secs(2)).await.unwrap() {
            billing.ack(&m).await.unwrap();
            acked += 1;
        }
    }
    web.refresh().await.unwrap();
    assert_eq!(text(&web, lag_cell).await, "0");
    shot(&web, &shots, "groups").await;
    web.goto(&format!("{base}/topics")).await.unwrap();
    assert!(text(&web, "#topics").await.contains("orders"));
    shot(&web, &shots, "topics").await;

    // A dead letter whose body, key and reason hold markup.
    p.send(Message::new("doomed", XSS_BODY).with_key("<b>key</b>"))
        .await
        .unwrap();
    let dg = Consumer::new(c.clone(), "dg", "doomed");
    let b2 = b.broker.clone();
    wait_until("the message is dead-lettered", || {
        let dg = dg.clone();
        let b2 = b2.clone();
        async move {
            for m in dg.receive(1, Duration::from_millis(200)).await.unwrap() {
                dg.nack(&m, XSS_REASON, None).await.unwrap();
            }
            b2.dead_letter_counts()
                .iter()
                .any(|(g, n)| g == "dg" && *n == 1)
        }
    })
    .await;
    web.goto(&format!("{base}/dlq")).await.unwrap();
    click(&web, "#dlq-groups a").await;
    wait_path(&web, "/dlq/dg").await;
    let row = text(&web, "#dead-letters").await;
    assert!(row.contains(XSS_BODY), "{row}");
    assert!(row.contains(XSS_REASON), "{row}");
    assert!(row.contains("<b>key</b>"), "{row}");
    let pwned = web
        .execute("return typeof window.__pwned;", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, serde_json::json!("undefined"), "markup ran");
    assert!(
        web.find_all(Locator::Css("#dead-letters script, #dead-letters img"))
            .await
            .unwrap()
            .is_empty(),
        "markup became elements"
    );
    shot(&web, &shots, "dlq").await;

    // A form without the session's token is refused, and changes nothing.
    let cookie = web
        .get_named_cookie("halfmq_session")
        .await
        .unwrap()
        .value()
        .to_owned();
    let (code, _) = tokio::task::spawn_blocking(move || {
        post(
            http,
            "/actions/purge",
            Some(&cookie),
            "group=dg&confirm=yes&csrf=forged",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 403);
    assert_eq!(b.broker.dead_letter_counts(), vec![("dg".to_owned(), 1)]);

    // Redrive asks first; Cancel does nothing, Confirm redrives.
    click(&web, "#dead-letters td form button").await;
    wait_text(&web, "h1", "Confirm").await;
    shot(&web, &shots, "confirm").await;
    click(&web, "#cancel").await;
    wait_path(&web, "/dlq/dg").await;
    assert_eq!(b.broker.dead_letter_counts(), vec![("dg".to_owned(), 1)]);
    click(&web, "#dead-letters td form button").await;
    click(&web, "#confirm button").await;
    assert!(
        text(&web, "#outcome").await.contains("Redrove 1"),
        "{}",
        text(&web, "#outcome").await
    );
    let mut again = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while again.is_empty() {
        again = dg.receive(1, Duration::from_millis(500)).await.unwrap();
        assert!(
            Instant::now() < deadline,
            "the redriven message was not delivered"
        );
    }
    assert_eq!(again[0].body.as_ref(), XSS_BODY.as_bytes());
    dg.ack(&again[0]).await.unwrap();

    // A half whose checks all answer UNKNOWN is given up; commit it here.
    let tp = TransactionProducer::new(c.clone(), "undecided-pg", |_| {
        std::future::ready(TransactionResolution::Unknown)
    });
    let tx = tp
        .send_half(Message::new("payments", "paid"))
        .await
        .unwrap();
    let b3 = b.broker.clone();
    wait_until("the half is given up", || {
        let b3 = b3.clone();
        async move { b3.stats().given_up_halves == 1 }
    })
    .await;
    web.goto(&format!("{base}/transactions")).await.unwrap();
    let row = format!("tr[data-tx='{}']", tx.transaction_id);
    assert!(text(&web, &row).await.contains("given up"));
    shot(&web, &shots, "transactions").await;
    click(&web, &format!("{row} form button")).await; // Commit
    wait_text(&web, "main", "Commit transaction").await;
    click(&web, "#confirm button").await;
    assert!(text(&web, "#outcome").await.contains("ended"));
    let pay = Consumer::new(c.clone(), "ledger", "payments");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() {
        got = pay.receive(1, Duration::from_millis(500)).await.unwrap();
        assert!(
            Instant::now() < deadline,
            "the committed half was not delivered"
        );
    }
    assert_eq!(got[0].message_id, tx.message_id);
    assert_eq!(b.broker.stats().given_up_halves, 0);

    web.goto(&format!("{base}/users")).await.unwrap();
    assert!(text(&web, "#users").await.contains("admin"));
    shot(&web, &shots, "users").await;
    web.goto(&base).await.unwrap();
    shot(&web, &shots, "overview-after").await;

    // Logging out ends the session.
    click(&web, "header form button").await;
    wait_path(&web, "/login").await;
    web.goto(&format!("{base}/groups")).await.unwrap();
    wait_path(&web, "/login").await;
    for page in [
        "login",
        "overview",
        "groups",
        "topics",
        "dlq",
        "confirm",
        "transactions",
        "users",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "{page}.png");
    }
    web.close().await.unwrap();
    drop(tp);
    b.shutdown().await.unwrap();
}

/// The console's forms without a browser, auth off: a visitor gets a
/// session at once; an action without the session's token is refused;
/// without `confirm=yes` it only asks; confirmed, it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_token_and_a_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_reconsume_times: 0,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let http = b.http_addr.unwrap();
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..2 {
        p.send(Message::new("bad", format!("b{i}"))).await.unwrap();
    }
    let cons = Consumer::new(c.clone(), "pg1", "bad");
    let deadline = Instant::now() + Duration::from_secs(15);
    while b.broker.dead_letter_counts() != vec![("pg1".to_owned(), 2)] {
        for m in cons.receive(2, Duration::from_millis(200)).await.unwrap() {
            cons.nack(&m, "no", None).await.unwrap();
        }
        assert!(Instant::now() < deadline, "not dead-lettered");
    }
    let http_call =
        move |m: &'static str, path: &'static str, cookie: Option<String>, form: String| {
            tokio::task::spawn_blocking(move || request(http, m, path, cookie.as_deref(), &form))
        };
    let (code, head, _) = http_call("GET", "/", None, String::new()).await.unwrap();
    assert_eq!(code, 200);
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: halfmq_session="))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    assert!(head.contains("HttpOnly; SameSite=Strict"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    let (_, _, page) = http_call("GET", "/dlq/pg1", Some(cookie.clone()), String::new())
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF token in the form")
        .to_owned();
    let purge = |csrf: &str, confirm: bool| {
        format!(
            "csrf={csrf}&group=pg1{}",
            if confirm { "&confirm=yes" } else { "" }
        )
    };
    // No token, a wrong one, another session's: refused.
    for (cookie, form) in [
        (Some(cookie.clone()), "group=pg1&confirm=yes".to_owned()),
        (Some(cookie.clone()), purge("0123", true)),
        (None, purge(&csrf, true)),
    ] {
        let (code, _, _) = http_call("POST", "/actions/purge", cookie, form)
            .await
            .unwrap();
        assert_eq!(code, 403);
    }
    assert_eq!(b.broker.dead_letter_counts(), vec![("pg1".to_owned(), 2)]);
    // Unconfirmed: a question, nothing done.
    let (code, _, page) = http_call(
        "POST",
        "/actions/purge",
        Some(cookie.clone()),
        purge(&csrf, false),
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        page.contains("Purge every dead letter of group pg1?"),
        "{page}"
    );
    assert!(page.contains("name=\"confirm\" value=\"yes\""), "{page}");
    assert_eq!(b.broker.dead_letter_counts(), vec![("pg1".to_owned(), 2)]);
    // Redrive all, confirmed: both come back to the group.
    let (code, _, page) = http_call(
        "POST",
        "/actions/redrive",
        Some(cookie.clone()),
        format!("csrf={csrf}&group=pg1&message_id=&confirm=yes"),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Redrove 2 dead letter(s)"), "{page}");
    let mut back = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while back < 2 {
        for m in cons.receive(2, Duration::from_millis(300)).await.unwrap() {
            cons.nack(&m, "still no", None).await.unwrap();
            back += 1;
        }
        assert!(Instant::now() < deadline, "redriven letters not delivered");
    }
    // Dead-lettered again (max_reconsume_times 0), then purged for good.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.broker.dead_letter_counts() != vec![("pg1".to_owned(), 2)] {
        assert!(Instant::now() < deadline, "not dead-lettered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, page) = http_call(
        "POST",
        "/actions/purge",
        Some(cookie.clone()),
        purge(&csrf, true),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Purged 2 dead letter(s)"), "{page}");
    assert_eq!(b.broker.dead_letter_counts(), vec![("pg1".to_owned(), 0)]);
    // A bad message id is a clear error, not a redrive of everything.
    let (code, _, page) = http_call(
        "POST",
        "/actions/redrive",
        Some(cookie),
        format!("csrf={csrf}&group=pg1&message_id=zz&confirm=yes"),
    )
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert!(page.contains("is not 32 hex digits"), "{page}");
    b.shutdown().await.unwrap();
}
