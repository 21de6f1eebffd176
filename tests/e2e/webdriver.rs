//! A real headless browser for the sign-in scenarios: Debian's `chromium`, driven through
//! `chromedriver` (package `chromium-driver`) with the W3C WebDriver protocol, on loopback.
//! Only what a person does on AWX's sign-in pages: open a URL, type into a field, press a
//! button, read the page.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::support::{free_port, wait_for};

/// The element reference key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Debian installs the browser and its driver, if it does.
pub fn installed() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| names.iter().map(PathBuf::from).find(|p| p.exists());
    Some((
        find(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"])?,
        find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])?,
    ))
}

/// A chromedriver process and one browser session in it; both end when this is dropped.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless chromium session with a
    /// profile of its own under `profile`.
    pub async fn start(chromium: &Path, driver: &Path, profile: &Path) -> Result<Self, String> {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", driver.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver: child,
            base,
            session: String::new(),
            http,
        };
        wait_for(
            "chromedriver to answer",
            Duration::from_secs(30),
            || async { Ok(browser_status(&browser).await.then_some(())) },
        )
        .await?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let answer = browser
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await?;
        browser.session = answer["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session in {answer}"))?
            .to_string();
        Ok(browser)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let value: Value = answer.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("WebDriver {path}: {status} {}", value["value"]));
        }
        Ok(value["value"].clone())
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn open(&self, url: &str) -> Result<(), String> {
        self.call(
            reqwest::Method::POST,
            &self.at("/url"),
            Some(json!({"url": url})),
        )
        .await
        .map(|_| ())
    }

    pub async fn current_url(&self) -> Result<String, String> {
        Ok(self
            .call(reqwest::Method::GET, &self.at("/url"), None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The element `css` selects, waiting for the page to show it.
    async fn element(&self, css: &str) -> Result<String, String> {
        wait_for(
            &format!("the page to show {css}"),
            Duration::from_secs(30),
            || async {
                let found = self
                    .call(
                        reqwest::Method::POST,
                        &self.at("/element"),
                        Some(json!({"using": "css selector", "value": css})),
                    )
                    .await;
                Ok(found
                    .ok()
                    .and_then(|v| v[ELEMENT].as_str().map(str::to_string)))
            },
        )
        .await
    }

    pub async fn type_into(&self, css: &str, text: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        )
        .await
        .map(|_| ())
    }

    pub async fn click(&self, css: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.call(
            reqwest::Method::POST,
            &self.at(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }
}

async fn browser_status(browser: &Browser) -> bool {
    browser
        .call(reqwest::Method::GET, "/status", None)
        .await
        .is_ok_and(|v| v["ready"] == true)
}

impl Browser {
    /// Ends the session (the browser exits) and then the driver.
    pub async fn quit(self) {
        let _ = self.call(reqwest::Method::DELETE, &self.at(""), None).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
