//! The console's page frame and shared bits: layout, login, confirmation,
//! result pages, number formats. maud escapes every `(expr)`; the only
//! unescaped text is the stylesheet and charts made of numbers.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::Caller;

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#1a202c;background:#f7fafc}
header{background:#1a365d;color:#fff;padding:.6rem 1rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#e2e8f0;text-decoration:none}header a.on{color:#fff;font-weight:600;border-bottom:2px solid #90cdf4}
header .who{margin-left:auto;font-size:.9rem}header form{display:inline}
main{padding:1rem 1.5rem}h1{font-size:1.3rem;margin:.2rem 0 1rem}h2{font-size:1.05rem;margin:1.2rem 0 .5rem}
table{border-collapse:collapse;background:#fff;margin-bottom:1rem}
th,td{border:1px solid #e2e8f0;padding:.3rem .6rem;text-align:left;font-size:.9rem;vertical-align:top}
th{background:#edf2f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{background:#fff;border:1px solid #e2e8f0;padding:.6rem .8rem;min-width:10rem}
.card .v{font-size:1.3rem;font-weight:600}.card .k{font-size:.8rem;color:#4a5568}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.chart{background:#fff;border:1px solid #e2e8f0;padding:.5rem}
.chart .k{font-size:.8rem;color:#4a5568}.muted{color:#718096}
button{cursor:pointer;padding:.2rem .6rem}button.danger{background:#c53030;color:#fff;border:1px solid #9b2c2c}
.flash{background:#f0fff4;border:1px solid #9ae6b4;padding:.5rem .8rem;margin-bottom:1rem}
.error{background:#fff5f5;border:1px solid #feb2b2;padding:.5rem .8rem;margin-bottom:1rem}
pre{white-space:pre-wrap;word-break:break-all;margin:0;max-width:40rem}
td code{font-size:.8rem;word-break:break-all;max-width:22rem;display:inline-block}td .muted{font-size:.8rem}
";

/// The console's pages, in the menu's order: (path, title).
pub(super) const MENU: [(&str, &str); 6] = [
    ("/", "Overview"),
    ("/topics", "Topics"),
    ("/groups", "Consumer groups"),
    ("/transactions", "Transactions"),
    ("/dlq", "Dead letters"),
    ("/users", "Users"),
];

fn head(title: &str) -> Markup {
    html! {
        (DOCTYPE)
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · halfmq" }
        style { (PreEscaped(STYLE)) }
    }
}

/// A page of the console: menu (with `active` marked), the caller, `body`.
pub(super) fn layout(caller: &Caller, active: &str, title: &str, body: Markup) -> Markup {
    html! {
        (head(title))
        header {
            strong { "halfmq" }
            @for (path, name) in MENU {
                a href=(path) class=[(path == active).then_some("on")] { (name) }
            }
            span.who {
                @if caller.auth {
                    "signed in as " b { (caller.user) } " "
                    form method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(caller.csrf);
                        button type="submit" { "Log out" }
                    }
                } @else {
                    span.muted { "auth is off: anyone who reaches this port can act" }
                }
            }
        }
        main {
            h1 { (title) }
            (body)
        }
    }
}

/// A page outside the console's frame (refusals).
pub(super) fn bare(title: &str, text: &str) -> Markup {
    html! {
        (head(title))
        main { h1 { (title) } p { (text) } p { a href="/" { "Back to the console" } } }
    }
}

/// The login form, with why the last attempt failed.
pub(super) fn login(error: Option<&str>) -> Markup {
    html! {
        (head("Log in"))
        main {
            h1 { "halfmq console" }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/login" {
                p { label { "User " input type="text" name="user" id="user" autocomplete="username" required; } }
                p { label { "Secret " input type="password" name="secret" id="secret" autocomplete="current-password" required; } }
                p { button type="submit" id="login" { "Log in" } }
            }
            p.muted { "A user with admin on cluster; the halfmq secret, as the CLI's --secret." }
        }
    }
}

/// A form posting `fields` to `action`, with the caller's CSRF token, and
/// one button.
pub(super) fn action_form(
    caller: &Caller,
    action: &str,
    fields: &[(&str, &str)],
    label: &str,
    danger: bool,
) -> Markup {
    html! {
        form method="post" action=(action) style="display:inline" {
            input type="hidden" name="csrf" value=(caller.csrf);
            @for (k, v) in fields { input type="hidden" name=(k) value=(v); }
            button type="submit" class=[danger.then_some("danger")] { (label) }
        }
    }
}

/// The confirmation of an action: what will happen, Confirm (posts the
/// same fields with `confirm=yes`) or Cancel (back to `back`).
pub(super) fn confirm(
    caller: &Caller,
    active: &str,
    question: &str,
    action: &str,
    fields: &[(&str, &str)],
    back: &str,
) -> Markup {
    let mut all: Vec<(&str, &str)> = fields.to_vec();
    all.push(("confirm", "yes"));
    layout(
        caller,
        active,
        "Confirm",
        html! {
            p { (question) }
            // A form cannot sit inside a <p>.
            div id="confirm" {
                (action_form(caller, action, &all, "Confirm", true))
                " "
                a href=(back) id="cancel" { "Cancel" }
            }
        },
    )
}

/// The outcome of an action, with a link back.
pub(super) fn outcome(
    caller: &Caller,
    active: &str,
    result: Result<String, String>,
    back: &str,
) -> Markup {
    layout(
        caller,
        active,
        "Done",
        html! {
            @match result {
                Ok(m) => p.flash id="outcome" { (m) },
                Err(e) => p.error id="outcome" { (e) },
            }
            p { a href=(back) id="back" { "Back" } }
        },
    )
}

/// `n` bytes in binary units.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration in ms as `1h 2m`, `3m 4s` or `5.6 s`.
pub(super) fn age(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(1500), "1.5 s");
        assert_eq!(age(125_000), "2m 5s");
        assert_eq!(age(3_720_000), "1h 2m");
    }

    #[test]
    fn what_a_page_shows_is_escaped() {
        let c = Caller {
            user: "<script>alert(1)</script>".into(),
            csrf: "t\"><x".into(),
            auth: true,
            set_cookie: None,
        };
        let page = layout(
            &c,
            "/",
            "<b>",
            html! { p { ("<img src=x onerror=alert(1)>") } },
        )
        .into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<img src=x"));
        assert!(page.contains("value=\"t&quot;&gt;&lt;x\""), "{page}");
    }
}
