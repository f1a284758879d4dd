//! Process-wide settings for a fair measurement: CPU pinning and the file-descriptor limit.

/// Restricts the calling thread, and every thread it starts afterwards, to the first CPU it may
/// run on. Call before starting the runtime.
pub fn pin_to_one_cpu() -> std::io::Result<()> {
    // SAFETY: `cpu_set_t` is plain data for which all-zeroes is a valid (empty) set; CPU_ZERO,
    // CPU_ISSET and CPU_SET only touch that local set; `sched_getaffinity` and
    // `sched_setaffinity` read or write exactly `size_of::<cpu_set_t>()` bytes of it, and pid 0
    // means the calling thread.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &allowed))
            .ok_or_else(|| std::io::Error::other("no CPU available"))?;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut one);
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, size, &one) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to at least `wanted` (up to the hard limit).
pub fn raise_fd_limit(wanted: usize) {
    // SAFETY: `rlimit` is plain data; getrlimit/setrlimit read and write exactly one of them.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && (limit.rlim_cur as usize) < wanted
        {
            limit.rlim_cur = (wanted as libc::rlim_t).min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
