//! Buffered log output: per-thread buffers, flushed by size or by a timer.
//!
//! The access log writes one JSON line per request (formatted by `accesslog` and handed over
//! with [`LogBuffer::write_line`]; every other line comes through tracing's
//! [`MakeWriter`]). Written straight to stderr, that is one
//! `write(2)` per request; handed to a writer thread (`tracing-appender`'s non-blocking
//! writer), it is a channel send that wakes that thread, a `futex` per request when the
//! thread sleeps. Here each thread appends its lines to its own buffer (an uncontended lock:
//! no syscall), and the buffer goes out in one `write` when it holds [`FLUSH_BYTES`], or
//! when the flusher thread comes by, every [`FLUSH_EVERY`]: the same bounds as nginx's
//! `access_log ... buffer=64k flush=1s`.
//!
//! What can be lost: on a crash (SIGKILL, abort, power), at most the last [`FLUSH_EVERY`] and
//! [`FLUSH_BYTES`] per thread of `info` and `debug` lines. Warnings and errors are never held
//! back: they flush their thread's buffer at once, in order, since they are what an operator
//! reads after an incident. A panic flushes every buffer (its hook), a thread flushes its
//! buffer when it ends, and `tfmirror serve` flushes everything when it exits.
//!
//! Order: one thread's lines stay in order. Lines of different threads can come out up to
//! [`FLUSH_EVERY`] apart from their order in time; every line carries its timestamp.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// A thread's buffer goes out when it holds this much.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// The flusher thread writes every buffer out this often.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Log lines buffered per thread on their way to one sink.
#[derive(Clone)]
pub struct LogBuffer(Arc<Shared>);

struct Shared {
    /// Tells this buffer's slots apart in a thread's list (tests use several buffers).
    id: usize,
    limit: usize,
    sink: Mutex<Box<dyn Write + Send>>,
    slots: Mutex<Vec<Weak<Slot>>>,
}

/// One thread's pending lines for one [`LogBuffer`].
struct Slot {
    pending: Mutex<Vec<u8>>,
    owner: Weak<Shared>,
}

/// A thread's slots; flushed when the thread ends.
struct Local(Vec<(usize, Arc<Slot>)>);

impl Drop for Local {
    fn drop(&mut self) {
        for (_, slot) in &self.0 {
            if let Some(shared) = slot.owner.upgrade() {
                let mut pending = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
                shared.write_out(&mut pending);
            }
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = const { RefCell::new(Local(Vec::new())) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Shared {
    /// Write `pending` to the sink and empty it. Errors are dropped: there is nowhere left to
    /// report them, and a full disk must not stop the proxy.
    fn write_out(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.write_all(pending).and_then(|()| sink.flush());
        pending.clear();
    }

    fn slot(self: &Arc<Self>) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            pending: Mutex::new(Vec::with_capacity(self.limit.min(FLUSH_BYTES))),
            owner: Arc::downgrade(self),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Append one formatted line from the current thread.
    fn append(self: &Arc<Self>, line: &[u8], urgent: bool) {
        self.append_with(|pending| pending.extend_from_slice(line), urgent);
    }

    /// Append what `write` writes (one or more whole lines) to the current thread's buffer.
    fn append_with(self: &Arc<Self>, write: impl FnOnce(&mut Vec<u8>), urgent: bool) {
        let mut write = Some(write);
        let appended = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            // Borrowed, not cloned: no reference count to touch on every line.
            let at = match local.0.iter().position(|(id, _)| *id == self.id) {
                Some(at) => at,
                None => {
                    local.0.push((self.id, self.slot()));
                    local.0.len() - 1
                }
            };
            let slot = &local.0[at].1;
            let mut pending = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(write) = write.take() {
                write(&mut pending);
            }
            if urgent || pending.len() >= self.limit {
                self.write_out(&mut pending);
            }
        });
        if let (Err(_), Some(write)) = (appended, write) {
            // The thread is ending and its buffer is gone: write through.
            let mut line = Vec::new();
            write(&mut line);
            self.write_out(&mut line);
        }
    }
}

impl LogBuffer {
    /// Buffers of `limit` bytes per thread in front of `sink`.
    pub fn new(sink: impl Write + Send + 'static, limit: usize) -> LogBuffer {
        LogBuffer(Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            limit,
            sink: Mutex::new(Box::new(sink)),
            slots: Mutex::new(Vec::new()),
        }))
    }

    /// Append one whole line (newline included) from the current thread, as an `info` line:
    /// it waits for the size limit or the timer. For lines formatted without tracing (the
    /// access line, see `accesslog`); they keep their order with this thread's tracing lines.
    pub fn write_line(&self, line: &[u8]) {
        self.0.append(line, false);
    }

    /// Like [`write_line`](Self::write_line), with the line written by `write` straight into
    /// this thread's buffer: no copy of it on the way. `write` must write whole lines.
    pub fn write_line_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        self.0.append_with(write, false);
    }

    /// Write every thread's pending lines out now.
    pub fn flush(&self) {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.0.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter().filter_map(Weak::upgrade).collect()
        };
        for slot in slots {
            let mut pending = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.0.write_out(&mut pending);
        }
    }

    /// Like [`flush`](Self::flush), but skips any buffer that is in use right now: for a
    /// panic hook, which may run while this very thread holds its buffer.
    fn flush_nonblocking(&self) {
        let Ok(slots) = self.0.slots.try_lock() else {
            return;
        };
        for slot in slots.iter().filter_map(Weak::upgrade) {
            if let Ok(mut pending) = slot.pending.try_lock() {
                if let Ok(mut sink) = self.0.sink.try_lock() {
                    let _ = sink.write_all(&pending).and_then(|()| sink.flush());
                    pending.clear();
                }
            }
        }
    }

    /// A thread that flushes every `every`, for as long as the buffer exists.
    pub fn spawn_flusher(&self, every: Duration) {
        let weak = Arc::downgrade(&self.0);
        std::thread::Builder::new()
            .name("tfmirror-log".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                match weak.upgrade() {
                    Some(shared) => LogBuffer(shared).flush(),
                    None => return,
                }
            })
            .expect("spawn the log flusher");
    }
}

/// The writer tracing gets for one event: the whole formatted line comes in one `write`.
pub struct LineWriter<'a> {
    buffer: &'a LogBuffer,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.buffer.0.append(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            buffer: self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            buffer: self,
            // `Level` orders by verbosity: WARN and ERROR are the two least verbose.
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

static STDERR: OnceLock<LogBuffer> = OnceLock::new();

/// The process's buffered stderr: created on first use, with its flusher thread and a panic
/// hook that flushes it.
pub fn stderr() -> LogBuffer {
    STDERR
        .get_or_init(|| {
            let buffer = LogBuffer::new(io::stderr(), FLUSH_BYTES);
            buffer.spawn_flusher(FLUSH_EVERY);
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if let Some(b) = STDERR.get() {
                    b.flush_nonblocking();
                }
                previous(info);
            }));
            buffer
        })
        .clone()
}

/// Flush the buffered stderr, if it is in use: before the process exits.
pub fn flush() {
    if let Some(b) = STDERR.get() {
        b.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each `write_all` as one write call.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn writes(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
    }

    fn line(b: &LogBuffer, text: &str, urgent: bool) {
        let mut w = LineWriter { buffer: b, urgent };
        w.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_wait_for_the_size_limit_then_go_out_in_one_write() {
        let sink = Sink::default();
        let b = LogBuffer::new(sink.clone(), 100);
        for i in 0..9 {
            line(&b, &format!("line {i:02}\n"), false); // 8 bytes each
        }
        assert_eq!(sink.writes(), 0, "72 bytes stay buffered");
        for i in 9..13 {
            line(&b, &format!("line {i:02}\n"), false);
        }
        assert_eq!(sink.writes(), 1, "the 13th line passes 100 bytes");
        assert_eq!(sink.text().lines().count(), 13);
        line(&b, "line 13\n", false);
        assert_eq!(sink.writes(), 1);
        b.flush();
        assert_eq!(sink.writes(), 2);
        let expected: String = (0..14).map(|i| format!("line {i:02}\n")).collect();
        assert_eq!(sink.text(), expected);
    }

    #[test]
    fn warnings_and_errors_flush_at_once_in_order() {
        let sink = Sink::default();
        let b = LogBuffer::new(sink.clone(), 1 << 20);
        line(&b, "access\n", false);
        line(&b, "warning\n", true);
        assert_eq!(sink.text(), "access\nwarning\n");
        assert_eq!(sink.writes(), 1);
    }

    #[test]
    fn through_tracing_info_waits_and_warn_flushes() {
        let sink = Sink::default();
        let b = LogBuffer::new(sink.clone(), 1 << 20);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(b.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(route = "module_versions", "access");
            tracing::debug!("debug");
            assert_eq!(sink.writes(), 0, "info lines wait");
            tracing::warn!("upstream slow");
            assert_eq!(sink.writes(), 1, "a warning goes out with what came before");
            tracing::error!("broken");
            assert_eq!(sink.writes(), 2);
        });
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains(r#""route":"module_versions""#));
        assert!(lines[1].contains("upstream slow") && lines[2].contains("broken"));
    }

    #[test]
    fn the_timer_and_thread_exit_flush_other_threads_lines() {
        let sink = Sink::default();
        let b = LogBuffer::new(sink.clone(), 1 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            line(&b2, "from a worker\n", false);
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            line(&b2, "at its end\n", false);
        });
        rx.recv().unwrap();
        assert_eq!(sink.writes(), 0);
        b.spawn_flusher(Duration::from_millis(20));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.writes() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.text(), "from a worker\n", "the timer flushed it");
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(
            sink.text(),
            "from a worker\nat its end\n",
            "thread exit flushed"
        );
    }
}
