//! A small blocking HTTP/1.1 client for `http://` binary caches: one GET per connection
//! (`Connection: close`), bodies delimited by Content-Length, chunked encoding or the end
//! of the connection, connect and read timeouts. No TLS, no redirects, no keep-alive.
//! Only the substituter child process uses it (never the event loop). Knows nothing of
//! narinfo or NAR files.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest status or header line accepted.
const MAX_LINE: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

#[derive(Debug)]
pub enum HttpError {
    BadUrl(String),
    /// Connecting to or talking with `url` failed.
    Io {
        url: String,
        err: io::Error,
    },
    /// The server's answer is not HTTP/1.x as we understand it.
    Protocol {
        url: String,
        what: String,
    },
    /// A status other than 200 or "not found".
    Status {
        url: String,
        code: u16,
        reason: String,
    },
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadUrl(u) => write!(f, "parse URL '{u}': expected http://HOST[:PORT]/PATH"),
            HttpError::Io { url, err } => write!(f, "download {url}: {err}"),
            HttpError::Protocol { url, what } => write!(f, "download {url}: {what}"),
            HttpError::Status { url, code, reason } => {
                write!(f, "download {url}: HTTP error {code} {reason}")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// `http://host[:port]/base`, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// The path prefix, without a trailing slash ("" for the root).
    pub base: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, HttpError> {
        let bad = || HttpError::BadUrl(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // [v6]:port
            let (h, p) = h.split_once(']').ok_or_else(bad)?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if p.is_empty() => 80,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 80),
            }
        };
        if path.contains(['?', '#', ' ']) {
            return Err(bad());
        }
        Ok(HttpUrl {
            host,
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }

    pub fn url_of(&self, rel: &str) -> String {
        format!("http://{}:{}{}/{}", self.host, self.port, self.base, rel)
    }
}

/// How the body of a response ends.
enum Framing {
    Length(u64),
    Chunked {
        /// Bytes left in the current chunk; `None` before the first chunk header.
        left: Option<u64>,
        done: bool,
    },
    Close,
}

/// A response body. Reading reports a body cut short (connection closed before
/// Content-Length bytes or the last chunk) as `UnexpectedEof`.
pub struct Body {
    r: BufReader<TcpStream>,
    framing: Framing,
    url: String,
}

fn proto(url: &str, what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("download {url}: {}", what.into()),
    )
}

fn read_line(r: &mut BufReader<TcpStream>, url: &str) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("download {url}: the connection closed early"),
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(proto(url, "line too long or cut short"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| proto(url, "header line is not UTF-8"))
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match &mut self.framing {
                Framing::Close => return self.r.read(buf),
                Framing::Length(left) => {
                    if *left == 0 {
                        return Ok(0);
                    }
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "download {}: the connection closed with {left} bytes of the body missing",
                                self.url
                            ),
                        ));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                Framing::Chunked { done: true, .. } => return Ok(0),
                Framing::Chunked { left, done } => match left {
                    Some(0) => {
                        // End of a chunk: its CRLF, then the next header.
                        let l = read_line(&mut self.r, &self.url)?;
                        if !l.is_empty() {
                            return Err(proto(&self.url, "chunk not followed by CRLF"));
                        }
                        *left = None;
                    }
                    None => {
                        let l = read_line(&mut self.r, &self.url)?;
                        let size = l.split(';').next().unwrap_or("").trim();
                        let size = u64::from_str_radix(size, 16)
                            .map_err(|_| proto(&self.url, format!("bad chunk size '{l}'")))?;
                        if size == 0 {
                            // Trailers until an empty line.
                            loop {
                                if read_line(&mut self.r, &self.url)?.is_empty() {
                                    break;
                                }
                            }
                            *done = true;
                            return Ok(0);
                        }
                        *left = Some(size);
                    }
                    Some(n) => {
                        let want = buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                        let got = self.r.read(&mut buf[..want])?;
                        if got == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!(
                                    "download {}: the connection closed inside a chunk",
                                    self.url
                                ),
                            ));
                        }
                        *n -= got as u64;
                        return Ok(got);
                    }
                },
            }
        }
    }
}

/// GETs `url`'s `rel`. `Ok(None)` for 404/403/410 (the file is not there), the body for
/// 200, an error otherwise.
pub fn get(base: &HttpUrl, rel: &str) -> Result<Option<Body>, HttpError> {
    let url = base.url_of(rel);
    let io_e = |err| HttpError::Io {
        url: url.clone(),
        err,
    };
    let addrs = (base.host.as_str(), base.port)
        .to_socket_addrs()
        .map_err(io_e)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = stream.ok_or_else(|| io_e(last))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_e)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_e)?;
    let _ = stream.set_nodelay(true);
    let host = if base.host.contains(':') {
        format!("[{}]", base.host)
    } else {
        base.host.clone()
    };
    let req = format!(
        "GET {}/{} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: hauberk/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        base.base,
        rel,
        host,
        base.port,
        env!("CARGO_PKG_VERSION")
    );
    (&stream).write_all(req.as_bytes()).map_err(io_e)?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let status = read_line(&mut r, &url).map_err(io_e)?;
    let mut parts = status.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| HttpError::Protocol {
            url: url.clone(),
            what: format!("bad status line '{status}'"),
        })?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut length = None;
    let mut chunked = false;
    let mut n = 0;
    loop {
        let line = read_line(&mut r, &url).map_err(io_e)?;
        if line.is_empty() {
            break;
        }
        n += 1;
        if n > MAX_HEADERS {
            return Err(HttpError::Protocol {
                url,
                what: "too many headers".into(),
            });
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(HttpError::Protocol {
                url,
                what: format!("bad header line '{line}'"),
            });
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<u64>().map_err(|_| HttpError::Protocol {
                url: url.clone(),
                what: format!("bad Content-Length '{v}'"),
            })?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    match code {
        200 => {}
        403 | 404 | 410 => return Ok(None),
        _ => {
            return Err(HttpError::Status { url, code, reason });
        }
    }
    let framing = if chunked {
        Framing::Chunked {
            left: None,
            done: false,
        }
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        Framing::Close
    };
    Ok(Some(Body { r, framing, url }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://localhost:8080/cache/").unwrap();
        assert_eq!(u.host, "localhost");
        assert_eq!(u.port, 8080);
        assert_eq!(u.base, "/cache");
        assert_eq!(
            u.url_of("x.narinfo"),
            "http://localhost:8080/cache/x.narinfo"
        );
        let u = HttpUrl::parse("http://example.org").unwrap();
        assert_eq!((u.port, u.base.as_str()), (80, ""));
        let u = HttpUrl::parse("http://[::1]:81/c").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        for bad in [
            "https://x/",
            "http://",
            "http://h:port/",
            "http://h/a?b",
            "http://u@h/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// Serves one connection with a canned response.
    fn serve(response: &'static [u8]) -> HttpUrl {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response);
        });
        HttpUrl::parse(&format!("http://127.0.0.1:{port}/c")).unwrap()
    }

    fn body(resp: &'static [u8]) -> io::Result<Vec<u8>> {
        let mut b = get(&serve(resp), "f").unwrap().unwrap();
        let mut v = Vec::new();
        b.read_to_end(&mut v)?;
        Ok(v)
    }

    #[test]
    fn bodies() {
        assert_eq!(
            body(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap(),
            b"hello"
        );
        assert_eq!(
            body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nT: v\r\n\r\n")
                .unwrap(),
            b"hello"
        );
        assert_eq!(body(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap(), b"hello");
        let e = body(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nhel").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn statuses() {
        assert!(get(
            &serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            "f"
        )
        .unwrap()
        .is_none());
        let e = get(&serve(b"HTTP/1.1 500 Oops\r\n\r\n"), "f")
            .err()
            .unwrap();
        assert!(e.to_string().contains("HTTP error 500 Oops"), "{e}");
        let e = get(&serve(b"garbage\r\n\r\n"), "f").err().unwrap();
        assert!(e.to_string().contains("bad status line"), "{e}");
    }

    #[test]
    fn connection_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let u = HttpUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = get(&u, "x").err().unwrap();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
