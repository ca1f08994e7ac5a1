// The Linux magic SysRq keys the toolbar offers (Documentation/admin-guide/sysrq.rst):
// [key, label] or, for the destructive ones that ask first, [key, label, warning],
// where the warning's "VM" is replaced by the VM's id. No DOM.

export const SYSRQ_KEYS = [
  ['h', 'help'],
  ['s', 'sync filesystems'],
  ['u', 'remount filesystems read-only'],
  ['b', 'reboot', 'reboots VM at once, without syncing or unmounting its filesystems'],
  ['o', 'power off', 'powers VM off at once'],
  ['c', 'crash (panic)', 'crashes the kernel of VM (a panic, and a crash dump if configured)'],
  ['e', 'terminate all tasks', 'sends SIGTERM to every process on VM except init'],
  ['i', 'kill all tasks', 'sends SIGKILL to every process on VM except init'],
  ['f', 'OOM kill', 'makes the OOM killer of VM kill a process'],
  ['k', 'SAK', 'kills every program on the current console of VM'],
  ['m', 'show memory'],
  ['t', 'show task states'],
  ['w', 'show blocked tasks'],
  ['l', 'backtrace all CPUs'],
  ['p', 'show registers'],
  ['d', 'show held locks'],
  ['q', 'show timers'],
  ['j', 'thaw filesystems'],
  ['n', 'nice real-time tasks'],
  ['r', 'keyboard to XLATE'],
  ['z', 'dump ftrace buffer'],
  ...Array.from({ length: 10 }, (_, n) => [String(n), `log level ${n}`]),
];

export const DESTRUCTIVE_SYSRQ = new Set(SYSRQ_KEYS.filter((entry) => entry.length === 3).map(([key]) => key));

/** A key's label ("reboot"), or the key itself if it is not in the table. */
export function sysrqLabel(key) {
  return SYSRQ_KEYS.find(([k]) => k === key)?.[1] || key;
}

/** What a destructive key does to `vm`, for the confirmation dialog; null for the others. */
export function sysrqWarning(key, vm) {
  const warning = SYSRQ_KEYS.find(([k]) => k === key)?.[2];
  return warning ? warning.replace('VM', vm) : null;
}
