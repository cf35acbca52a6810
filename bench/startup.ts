// Start-up time: from spawning a sidecar (the callee's, as the pair runs it) to the first 200 from
// its /readyz, several times, the median reported. /readyz answers once the identity is loaded and
// every data listener is up, which is when systemd or Podman may send traffic. Polled tightly
// (every millisecond) so that the polling adds less than the figure's resolution; each sidecar is
// stopped before the next starts, on the proxies' core, like the pair.
import http from "node:http";
import { startCalleeForTiming } from "./contenders.js";
import { freePort, tail } from "./procs.js";
import { ms, type StartupResult } from "./report.js";
import type { Stack } from "./stack.js";

/** One GET /readyz; resolves with the status, 0 when nothing listens yet. */
function readyz(port: number): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path: "/readyz", agent: false, timeout: 1_000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("error", () => resolve(0));
    req.on("timeout", () => req.destroy());
  });
}

export async function measureStartup(
  stack: Stack,
  times: number,
  progress: (message: string) => void,
): Promise<StartupResult> {
  const { procs } = stack.context;
  const samplesMs: number[] = [];
  for (let n = 1; n <= times; n++) {
    const port = await freePort();
    const started = performance.now();
    const proc = startCalleeForTiming(stack.context, port, n);
    const deadline = started + 15_000;
    let status = 0;
    while (status !== 200 && performance.now() < deadline && proc.exitCode === undefined) {
      status = await readyz(port);
      if (status !== 200) await new Promise((resolve) => setTimeout(resolve, 1));
    }
    const elapsed = performance.now() - started;
    await procs.stop(proc);
    if (status !== 200)
      throw new Error(`a sidecar started for the start-up timing was not ready:\n${tail(proc.logFile)}`);
    samplesMs.push(elapsed);
  }
  const sorted = [...samplesMs].sort((a, b) => a - b);
  const medianMs = sorted[Math.floor((sorted.length - 1) / 2)] as number;
  progress(`start-up    spawn to /readyz 200: median ${medianMs.toFixed(0)} ms of ${times}`);
  return { samplesMs, medianMs };
}

export function startupSection(result: StartupResult | null): string {
  if (!result) return "";
  return [
    "## Start-up",
    "",
    `From spawning the callee's sidecar (\`node … ashmesh proxy --config\`, core 0) to the first 200 from its ` +
      `/readyz, polled every millisecond: median ${ms(result.medianMs)} ms of ${result.samplesMs.length} ` +
      `(${result.samplesMs.map((v) => v.toFixed(0)).join(", ")} ms).`,
  ].join("\n");
}
