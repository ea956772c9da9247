//! A real browser the tests can click: Debian's headless Chromium driven through its
//! chromedriver (W3C WebDriver) with `fantoccini`.
//!
//! [`Browser::start`] runs chromedriver on a free 127.0.0.1 port, in a process group of its own,
//! and opens one session: a headless Chromium with a private profile in a temporary directory.
//! Dropping the [`Browser`] kills that process group (chromedriver and the Chromium it started)
//! and removes the profile. [`crate::browser`] is the one-shot kind (load a page, dump its DOM or
//! save a screenshot); this one stays open, so a test can click and wait for the page to change.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::browser::chromium;
use crate::stack::{find_program, free_port};

/// The longest chromedriver may take to listen and the first session to open.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The viewport of every session, in CSS pixels (what the screenshots show).
pub const WINDOW: (u32, u32) = (1024, 860);

/// chromedriver's path, or which package brings it.
pub fn chromedriver() -> anyhow::Result<PathBuf> {
    find_program("chromedriver").context(
        "no chromedriver on PATH: apt-get install chromium-driver (Debian's chromedriver, \
         matching its chromium)",
    )
}

/// One chromedriver and the one headless Chromium session it drives.
pub struct Browser {
    client: Client,
    driver: Driver,
    /// Declared last: removed after the processes are gone.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and opens a session in a fresh headless Chromium.
    pub async fn start() -> anyhow::Result<Self> {
        let driver_path = chromedriver()?;
        let chromium = chromium()?;
        let profile = tempfile::Builder::new()
            .prefix("flash-sale-webdriver-")
            .tempdir()?;
        let log = profile.path().join("chromedriver.log");
        let port = free_port()?;
        let mut command = Command::new(&driver_path);
        command
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: Drop ends chromedriver and every Chromium process it started.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", driver_path.display()))?;
        // From here on, the guard cleans up whatever happens next.
        let mut driver = Driver { child, log };
        let client = driver
            .connect(port, &chromium, &profile.path().join("profile"))
            .await?;
        Ok(Self {
            client,
            driver,
            profile,
        })
    }

    /// The WebDriver client, for what the helpers below do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Loads `url` (returns once the page's `load` event fired).
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("loading {url}"))
    }

    /// The rendered text of the element `css` selects.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("finding {css}"))?;
        Ok(element.text().await?.trim().to_owned())
    }

    /// Whether the element `css` selects (a button, an input) is enabled.
    pub async fn is_enabled(&self, css: &str) -> anyhow::Result<bool> {
        let element = self.client.find(Locator::Css(css)).await?;
        Ok(element.is_enabled().await?)
    }

    /// Whether the element `css` selects is shown (not hidden by the page's styles).
    pub async fn is_displayed(&self, css: &str) -> anyhow::Result<bool> {
        let element = self.client.find(Locator::Css(css)).await?;
        Ok(element.is_displayed().await?)
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("finding {css}"))?
            .click()
            .await
            .with_context(|| format!("clicking {css}"))
    }

    /// Types `text` into the input `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("finding {css}"))?
            .send_keys(text)
            .await
            .with_context(|| format!("typing into {css}"))
    }

    /// Runs `script` in the page (its `return` is the answer).
    pub async fn execute(&self, script: &str) -> anyhow::Result<Value> {
        Ok(self.client.execute(script, Vec::new()).await?)
    }

    /// Polls the text of `css` every 50 ms until `done` holds for it, and returns it. Each text
    /// seen on the way is passed to `seen` (in order, once per change), so a test can check what
    /// the page went through. Fails after `timeout` with the last text.
    pub async fn wait_for_text(
        &self,
        css: &str,
        timeout: Duration,
        mut seen: impl FnMut(&str),
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<String> = None;
        loop {
            let text = self.text(css).await?;
            if last.as_deref() != Some(&text) {
                seen(&text);
            }
            if done(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{css} still reads {text:?} after {timeout:?}");
            }
            last = Some(text);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport to `out`.
    pub async fn screenshot(&self, out: &Path) -> anyhow::Result<()> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let png = self
            .client
            .screenshot()
            .await
            .context("taking a screenshot")?;
        std::fs::write(out, png).with_context(|| format!("writing {}", out.display()))
    }

    /// What chromedriver logged so far.
    pub fn log_text(&self) -> String {
        self.driver.log_text()
    }

    /// The private profile's directory (Chromium's user data and chromedriver's log).
    pub fn profile_dir(&self) -> &Path {
        self.profile.path()
    }
}

/// The chromedriver process; dropping it kills its process group.
struct Driver {
    child: Child,
    log: PathBuf,
}

impl Driver {
    /// Waits until chromedriver listens on `port`, then opens the session.
    async fn connect(
        &mut self,
        port: u16,
        chromium: &Path,
        user_data: &Path,
    ) -> anyhow::Result<Client> {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("chromedriver exited with {status}:\n{}", self.log_text());
            }
            if started.elapsed() > START_DEADLINE {
                bail!("chromedriver did not listen within {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let (width, height) = WINDOW;
        let options = json!({
            "binary": chromium,
            "args": [
                "--headless",
                // As root (CI), Chromium refuses to start with its sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                format!("--window-size={width},{height}"),
                format!("--user-data-dir={}", user_data.display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let url = format!("http://127.0.0.1:{port}");
        let session = builder.connect(&url);
        match tokio::time::timeout(START_DEADLINE, session).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => bail!(
                "chromedriver opened no session: {error}\n{}",
                self.log_text()
            ),
            Err(_) => bail!("chromedriver opened no session within {START_DEADLINE:?}"),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group is chromedriver's own pid (process_group(0) above); Chromium's processes are
        // in it too. `kill` the program: this crate forbids unsafe code, so no libc call.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
