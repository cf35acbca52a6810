// systemd socket activation (sd_listen_fds(3)): listening sockets handed over by systemd, so
// that `systemctl restart` never refuses a connection — systemd keeps the socket open while the
// old process drains and the new one starts, and connections wait in its backlog meanwhile.
// Sockets are found by FileDescriptorName= (inbound, outbound, admin); a single unnamed socket
// is the inbound one.

/** The first file descriptor systemd passes (SD_LISTEN_FDS_START). */
const FIRST_FD = 3;

export type ListenerName = "inbound" | "outbound" | "admin";

export function inheritedSockets(env: NodeJS.ProcessEnv = process.env, pid = process.pid): Map<ListenerName, number> {
  const sockets = new Map<ListenerName, number>();
  // LISTEN_PID guards against descriptors meant for a parent process.
  if (env.LISTEN_PID !== String(pid)) return sockets;
  const count = Number(env.LISTEN_FDS);
  if (!Number.isInteger(count) || count < 1) return sockets;
  const names = (env.LISTEN_FDNAMES ?? "").split(":");
  for (let i = 0; i < count; i++) {
    const name = names[i] || (count === 1 ? "inbound" : "");
    if (name === "inbound" || name === "outbound" || name === "admin") sockets.set(name, FIRST_FD + i);
  }
  return sockets;
}
