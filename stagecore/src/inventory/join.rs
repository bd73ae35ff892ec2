//! A bounded join: runs futures with at most `limit` in flight, results in input order.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// A boxed future borrowed for `'a`.
pub(crate) type Job<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs `jobs` concurrently on the current task, at most `limit` at a time; returns their outputs
/// in the order given.
pub(crate) async fn bounded<T>(jobs: Vec<Job<'_, T>>, limit: usize) -> Vec<T> {
    let limit = limit.max(1);
    let total = jobs.len();
    let mut pending = jobs.into_iter().enumerate();
    let mut running: Vec<(usize, Job<'_, T>)> = Vec::new();
    let mut out: Vec<Option<T>> = (0..total).map(|_| None).collect();
    let mut finished = 0;
    std::future::poll_fn(|cx| {
        loop {
            while running.len() < limit {
                match pending.next() {
                    Some(job) => running.push(job),
                    None => break,
                }
            }
            let mut progressed = false;
            let mut i = 0;
            while i < running.len() {
                if let Poll::Ready(v) = running[i].1.as_mut().poll(cx) {
                    let (index, _) = running.swap_remove(i);
                    out[index] = Some(v);
                    finished += 1;
                    progressed = true;
                } else {
                    i += 1;
                }
            }
            if finished == total {
                return Poll::Ready(());
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    })
    .await;
    out.into_iter().map(|v| v.expect("every job finished")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn keeps_order_and_bound() {
        let live = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let jobs: Vec<Job<'_, usize>> = (0..10usize)
            .map(|i| {
                let (live, peak) = (&live, &peak);
                Box::pin(async move {
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    for _ in 0..(10 - i) {
                        tokio::task::yield_now().await;
                    }
                    live.fetch_sub(1, Ordering::SeqCst);
                    i * 2
                }) as Job<'_, usize>
            })
            .collect();
        let out = bounded(jobs, 3).await;
        assert_eq!(out, (0..10).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(bounded(Vec::<Job<'_, u8>>::new(), 2).await.is_empty());
    }
}
