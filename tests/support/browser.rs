//! A real headless Chromium driven through WebDriver: Debian's `chromedriver` on a port of its
//! own, Chromium with a profile of its own (a temp dir), both in one process group that is
//! killed when the [`Browser`] drops. The WebDriver client (`fantoccini`) is async; these
//! wrappers block on a runtime of their own, so tests stay plain `#[test]`s beside the blocking
//! harness. Every wait is a poll with a generous deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use super::{find_binary, free_port, wait_until, READY_TIMEOUT};

/// How long an element may take to appear (the page polls the API; the machine is busy).
const ELEMENT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Option<Child>,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

/// Where screenshots go for a person to look at (printed by [`Browser::screenshot`]).
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. Panics with the driver's log when
    /// either cannot start (`scripts/test` installs `chromium` and `chromium-driver`).
    pub fn start() -> Browser {
        let driver_bin = find_binary("CHROMEDRIVER_BIN", "chromedriver", None)
            .expect("chromedriver not found: apt-get install chromium-driver (scripts/test does)");
        let chromium = find_binary("CHROMIUM_BIN", "chromium", None)
            .expect("chromium not found: apt-get install chromium (scripts/test does)");
        let profile = tempfile::tempdir().expect("profile dir");
        let log = profile.path().join("chromedriver.log");
        let port = free_port();
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()));
        // Its own process group: Chromium and its helpers die with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver =
            super::spawn_logged(&mut cmd, &profile.path().join("driver.out"), "chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut b = Browser {
            rt,
            client: None,
            driver: Some(driver),
            log,
            _profile: profile,
        };
        let status = format!("http://127.0.0.1:{port}/status");
        let ready = wait_until(READY_TIMEOUT, || {
            super::http()
                .get(&status)
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        assert!(ready, "chromedriver did not answer:\n{}", b.driver_log());
        let user_data = b._profile.path().join("chromium");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--window-size=1280,1000",
                    format!("--user-data-dir={}", user_data.display()),
                ],
            }
        });
        let caps = caps.as_object().cloned().unwrap_or_default();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = format!("http://127.0.0.1:{port}");
        let client = b.rt.block_on(
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url),
        );
        match client {
            Ok(c) => b.client = Some(c),
            Err(e) => panic!("no Chromium session: {e}\n{}", b.driver_log()),
        }
        b
    }

    fn driver_log(&self) -> String {
        super::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("browser session")
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Waits until `css` matches an element.
    pub fn wait_for(&self, css: &str) {
        let c = self.client();
        self.rt
            .block_on(
                c.wait()
                    .at_most(ELEMENT_TIMEOUT)
                    .for_element(Locator::Css(css)),
            )
            .unwrap_or_else(|e| panic!("no element {css}: {e}\npage: {}", self.body_text()));
    }

    /// Whether `css` matches an element now.
    pub fn exists(&self, css: &str) -> bool {
        self.rt
            .block_on(self.client().find_all(Locator::Css(css)))
            .is_ok_and(|v| !v.is_empty())
    }

    /// Waits until `css` matches no element.
    pub fn wait_gone(&self, css: &str) {
        assert!(
            wait_until(ELEMENT_TIMEOUT, || !self.exists(css)),
            "{css} is still there\npage: {}",
            self.body_text()
        );
    }

    /// The text of the first element `css` matches (after waiting for it).
    pub fn text(&self, css: &str) -> String {
        self.wait_for(css);
        let c = self.client();
        self.rt
            .block_on(async { c.find(Locator::Css(css)).await?.text().await })
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// Waits until the text of `css` contains `want`.
    pub fn wait_text(&self, css: &str, want: &str) {
        let ok = wait_until(ELEMENT_TIMEOUT, || {
            self.exists(css) && self.text(css).contains(want)
        });
        assert!(ok, "{css} never said {want:?}\npage: {}", self.body_text());
    }

    pub fn click(&self, css: &str) {
        self.wait_for(css);
        let c = self.client();
        self.rt
            .block_on(async { c.find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    pub fn type_into(&self, css: &str, text: &str) {
        self.wait_for(css);
        let c = self.client();
        self.rt
            .block_on(async { c.find(Locator::Css(css)).await?.send_keys(text).await })
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Runs `script` in the page (WebDriver's async script: it calls `arguments[0]` with the
    /// result).
    pub fn run_async(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.client().execute_async(script, Vec::new()))
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Resizes the window (a phone: 390 x 844).
    pub fn resize(&self, width: u32, height: u32) {
        self.rt
            .block_on(self.client().set_window_size(width, height))
            .unwrap_or_else(|e| panic!("resize: {e}"));
    }

    /// The whole page's text, for failure messages.
    pub fn body_text(&self) -> String {
        let c = self.client();
        self.rt
            .block_on(async { c.find(Locator::Css("body")).await?.text().await })
            .unwrap_or_default()
    }

    /// Saves a PNG of the window as `<screenshot_dir>/<name>.png` and returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .rt
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), c.close()).await });
        }
        if let Some(child) = &self.driver {
            // The driver's group: chromedriver, Chromium and its helpers, all started here.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
        }
        super::kill_and_reap(&mut self.driver);
    }
}
