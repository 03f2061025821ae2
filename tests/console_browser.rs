//! The console's page in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! through WebDriver): load `/ui/`, find the pulled repository in the table, search for it, open
//! it, pin a tag with the button and see the pin in `stowage ls`, purge a tag and see it gone.
//! Screenshots of each page are saved (see `support::browser::screenshot_dir`) for a person to
//! look at. With `[auth]`, an anonymous browser gets a 401 and can do nothing.

mod support;

use serde_json::Value;
use support::browser::Browser;
use support::images::{Format, Image};
use support::registry::Registry;
use support::stowage::{command_ok, ls_line, pull_image, Stowage, UpstreamSpec};
use support::write_htpasswd;

fn ls(stowage: &Stowage) -> String {
    command_ok(stowage, &["ls"])
}

#[test]
fn the_page_finds_pins_and_purges_a_pulled_image() {
    let upstream = Registry::start();
    let app = upstream.push("library/app", "1", Image::build(Format::Oci, &[256 * 1024]));
    let tool = upstream.push(
        "library/tool",
        "2",
        Image::build_for(Format::Oci, "arm64", &[128 * 1024]),
    );
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[console]\nallow_actions_without_auth = true\n")
        .start();
    pull_image(&stowage, &app);
    pull_image(&stowage, &tool);
    let browser = Browser::start();
    let ui = format!("{}/ui/", stowage.url());

    // The overview: sizes, traffic, the chart.
    browser.goto(&ui);
    browser.wait_for("#cache-card .bar");
    browser.wait_text("#who", "may pin and purge");
    browser.wait_for("svg.chart");
    browser.screenshot("1-overview");

    // The table lists both repositories; a search narrows it to one.
    browser.goto(&format!("{ui}#/repos"));
    browser.wait_for(r#"tr[data-repo="docker.io/library/app"]"#);
    browser.wait_for(r#"tr[data-repo="docker.io/library/tool"]"#);
    browser.screenshot("2-repositories");
    browser.type_into("#search", "tool");
    browser.wait_gone(r#"tr[data-repo="docker.io/library/app"]"#);
    browser.wait_text("#repo-count", "1 of 1");
    browser.screenshot("3-search");

    // The repository page: its tag, platform and the docker pull line.
    browser.click(r#"tr[data-repo="docker.io/library/tool"] a"#);
    browser.wait_text("h1", "docker.io/library/tool");
    browser.wait_text(r#"tr[data-tag="2"]"#, "linux/arm64/v8");
    let pull = browser.text("#pull-line");
    assert_eq!(
        pull,
        format!("docker pull {}/library/tool:2", stowage.host_port())
    );

    // Pin with the button: `stowage ls` shows the pin, the page too.
    assert!(ls_line(&stowage, "docker.io/library/tool:2")
        .unwrap()
        .ends_with(" no"));
    browser.click(r#"button[data-action="pin"][data-tag="2"]"#);
    browser.wait_for(r#"button[data-action="unpin"][data-tag="2"]"#);
    browser.wait_text("#status", "Pinned");
    let line = ls_line(&stowage, "docker.io/library/tool:2").unwrap();
    assert!(line.ends_with(" yes"), "{line}");
    browser.screenshot("4-repository-pinned");

    // Purge the other image's tag (two clicks: arm, then act): gone from `stowage ls` and disk.
    browser.goto(&format!("{ui}#/repo/docker.io%2Flibrary%2Fapp"));
    browser.wait_text("h1", "docker.io/library/app");
    browser.click(r#"button[data-action="purge"][data-tag="1"]"#);
    browser.wait_text(r#"button[data-action="purge"][data-tag="1"]"#, "again");
    browser.screenshot("5-purge-armed");
    browser.click(r#"button[data-action="purge"][data-tag="1"]"#);
    browser.wait_text("#status", "Purged");
    assert!(
        ls_line(&stowage, "docker.io/library/app:1").is_none(),
        "{}",
        ls(&stowage)
    );
    assert!(app
        .blobs()
        .iter()
        .all(|b| !stowage.blob_path(&b.digest).exists()));
    assert!(ls_line(&stowage, "docker.io/library/tool:2").is_some());

    // The eviction preview lists what is left, the pinned image excepted.
    browser.goto(&format!("{ui}#/evictions"));
    browser.wait_text("#evict-out", "blob(s)");
    browser.screenshot("6-eviction-preview");
    assert!(
        browser.text("#evict-out").contains("by removing 0 blob(s)"),
        "only pinned blobs are left"
    );

    // A phone-sized window: the same page, the table scrolls inside its box, the body does not
    // overflow sideways.
    browser.resize(390, 844);
    browser.goto(&format!("{ui}#/repos"));
    browser.wait_for(r#"tr[data-repo="docker.io/library/tool"]"#);
    let fits = browser.run_async(
        "const done = arguments[0]; \
         done(document.documentElement.scrollWidth <= window.innerWidth + 1);",
    );
    browser.screenshot("8-phone-repositories");
    assert_eq!(
        fits,
        Value::Bool(true),
        "the page overflows a phone's width"
    );
    browser.goto(&ui);
    browser.wait_for("#cache-card .bar");
    browser.screenshot("9-phone-overview");
}

#[test]
fn with_auth_an_anonymous_browser_gets_401_and_can_do_nothing() {
    let upstream = Registry::start();
    let app = upstream.push("library/app", "1", Image::build(Format::Oci, &[64 * 1024]));
    let files = tempfile::tempdir().unwrap();
    let htpasswd = write_htpasswd(files.path(), &[("alice", "a-pass")]);
    let toml = format!(
        "[auth]\nhtpasswd = {:?}\nopen_paths = [\"/healthz\"]\n[[auth.access]]\nusers = [\"anonymous\", \"*\"]\n\
         repositories = [\"**\"]\nactions = [\"pull\", \"delete\"]\n",
        htpasswd.display().to_string()
    );
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(&toml)
        .auth_required()
        .start();
    pull_image(&stowage, &app);
    let browser = Browser::start();
    browser.goto(&format!("{}/ui/", stowage.url()));
    // Chromium shows no page for the challenge it cannot answer: nothing of the console loads.
    assert!(!browser.exists("#view"), "no page without credentials");
    assert!(!browser.body_text().contains("Repositories"));
    browser.screenshot("7-anonymous-401");
    // Even a script on the mirror's own origin (an open path's page), with the header, cannot
    // read or act anonymously. (Credentials omitted: else Chromium would wait on a login prompt
    // no one answers.)
    browser.goto(&format!("{}/healthz", stowage.url()));
    browser.wait_text("body", "ok");
    let status = browser.run_async(
        "const done = arguments[0]; fetch('/api/v1/summary', {credentials: 'omit'}).then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(status, Value::from(401));
    let status = browser.run_async(
        "const done = arguments[0]; fetch('/api/v1/pins', {method: 'POST', credentials: 'omit', \
         headers: {'X-Requested-With': 'stowage', 'Content-Type': 'application/json'}, \
         body: JSON.stringify({reference: 'library/app:1'})}).then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(status, Value::from(401));
    assert!(ls_line(&stowage, "docker.io/library/app:1")
        .unwrap()
        .ends_with(" no"));
}
