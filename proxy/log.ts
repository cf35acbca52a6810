// The JSON logger: one object per line on stdout, in the seed's shape
// ({"timestamp", "level", "service", "event", ...}). Keys and certificates never reach it:
// callers pass identities and fingerprints, and the redaction below is a second line of defence.
import pino, { type DestinationStream, type Logger } from "pino";

export type { Logger };

export interface LogOptions {
  service: string;
  level: string;
  /** Where lines go; default stdout. Tests pass a stream and parse the lines back. */
  destination?: DestinationStream;
}

const LEVEL_THEN_TIME = /^\{("level":"[a-z]+"),("timestamp":"[^"]+")/;

export function createLogger(options: LogOptions): Logger {
  return pino(
    {
      level: options.level,
      base: { service: options.service },
      messageKey: "message",
      timestamp: () => `,"timestamp":"${new Date().toISOString()}"`,
      formatters: { level: (label) => ({ level: label }) },
      redact: { paths: ["key", "*.key", "privateKey", "*.privateKey", "pem", "*.pem"], censor: "[redacted]" },
      errorKey: "err",
      // pino always writes the level first; the seed's line starts with the timestamp.
      hooks: { streamWrite: (line) => line.replace(LEVEL_THEN_TIME, "{$2,$1") },
    },
    options.destination ?? pino.destination({ dest: 1, sync: true }),
  );
}
