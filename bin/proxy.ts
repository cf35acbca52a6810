// `ashmesh proxy --config FILE`: one sidecar in the foreground, until SIGTERM or SIGINT.
// SIGHUP (systemctl reload) reloads the identity files. With `workers` above 1 it runs as a
// primary and its worker processes (proxy/cluster.ts); a worker re-enters here.
import cluster from "node:cluster";
import { loadConfig } from "../config/load.js";
import { runPrimary, runWorker, workerCount } from "../proxy/cluster.js";
import { createLogger } from "../proxy/log.js";
import { Sidecar } from "../proxy/sidecar.js";
import { parse } from "./args.js";

const HELP = `ashmesh proxy [--config FILE]

Runs one sidecar. Without --config, the configuration comes from the environment alone
(SERVICE_NAME, SERVICE_DNS_NAME, MTLS_* ...; see the README). Environment variables override
the file. SIGHUP reloads certificates; SIGTERM drains (limits.drainTimeoutMs) and exits 0.
With workers: N (or auto, ASHMESH_WORKERS), N processes share the listeners.`;

export async function main(argv: string[]): Promise<number> {
  const { values } = parse({
    args: argv,
    options: { config: { type: "string", short: "c" }, help: { type: "boolean", short: "h" } },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  const config = loadConfig({ ...(values.config ? { file: values.config } : {}), env: process.env });
  if (cluster.isWorker) {
    const logger = createLogger({ service: config.service.name, level: config.log.level });
    return runWorker(config, logger.child({ worker: cluster.worker?.id }));
  }
  const workers = workerCount(config.workers);
  if (workers > 1) return runPrimary(config, workers);
  const sidecar = await Sidecar.create(config);
  try {
    await sidecar.start();
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { address?: string; port?: number };
    await sidecar.stop().catch(() => undefined);
    if (e.code === "EADDRINUSE" || e.code === "EACCES" || e.code === "EADDRNOTAVAIL") {
      throw new Error(
        `cannot listen on ${e.address}:${e.port}: ${e.code} (another process has it, or the address is not on this host)`,
      );
    }
    throw err;
  }
  process.on("SIGHUP", () => void sidecar.reload("SIGHUP"));
  const signal = await new Promise<string>((resolve) => {
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGINT", () => resolve("SIGINT"));
  });
  sidecar.logger.info({ event: "signal", signal });
  await sidecar.drain();
  return 0;
}
