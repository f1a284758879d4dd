//! Medians and process memory.

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of the pairwise ratios `a[i] / b[i]`.
pub fn ratio_median(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}

/// The resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> std::io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("unexpected /proc/self/statm"))?;
    Ok(pages * 4096)
}

/// What the process spent between two [`Usage::now`] readings: CPU time in user space and in
/// the kernel, and minor page faults (first touches of fresh memory, mostly).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User CPU time, in milliseconds.
    pub user_ms: f64,
    /// Kernel CPU time, in milliseconds.
    pub sys_ms: f64,
    /// Minor page faults.
    pub minflt: f64,
    /// Voluntary context switches (a thread blocking: a worker parking with nothing to run).
    pub nvcsw: f64,
}

impl Usage {
    /// The process's totals so far (every thread), from getrusage(2).
    pub fn now() -> Usage {
        // SAFETY: `rusage` is plain data for which all-zeroes is valid; getrusage writes
        // exactly one of them.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        Usage {
            user_ms: ms(usage.ru_utime),
            sys_ms: ms(usage.ru_stime),
            minflt: usage.ru_minflt as f64,
            nvcsw: usage.ru_nvcsw as f64,
        }
    }

    /// What was spent since `earlier`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            user_ms: self.user_ms - earlier.user_ms,
            sys_ms: self.sys_ms - earlier.sys_ms,
            minflt: self.minflt - earlier.minflt,
            nvcsw: self.nvcsw - earlier.nvcsw,
        }
    }

    /// The per-field medians of `runs`.
    pub fn median(runs: &[Usage]) -> Usage {
        let field = |f: fn(&Usage) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Usage {
            user_ms: field(|u| u.user_ms),
            sys_ms: field(|u| u.sys_ms),
            minflt: field(|u| u.minflt),
            nvcsw: field(|u| u.nvcsw),
        }
    }
}
