#!/usr/bin/env node
// Send one message with nodemailer and print the outcome as one JSON line on stdout.
// Used by mailgate's interop tests; run `node send.js --help` for the options.
//
// Exit codes: 0 sent (possibly with some recipients rejected: see "rejected"),
// 1 nodemailer reported an error, 2 bad command line.
'use strict';

const fs = require('node:fs');
const net = require('node:net');
const { format, parseArgs } = require('node:util');
const nodemailer = require('nodemailer');

const USAGE = `usage: node send.js --host HOST --port N [--secure | --starttls]
         [--user U --pass P [--auth-method PLAIN|LOGIN|CRAM-MD5]]
         [--from A --to B[,C...]] [--eml FILE | --subject S --text T]
         [--ca FILE | --insecure] [--servername NAME] [--name EHLO_NAME]
         [--lmtp] [--timeout MS] [--debug]

  --secure      implicit TLS from the first byte (SMTPS, port 465 style)
  --starttls    require STARTTLS; fail if the server does not offer it
                (with neither flag the session stays plaintext even if STARTTLS is offered)
  --eml FILE    send FILE byte for byte; --from/--to give the envelope
  --ca FILE     trust this PEM certificate (or CA) for the server's certificate
  --insecure    do not verify the server's certificate
  --servername  SNI name and the name the certificate must match (default: --host)
  --debug       log the SMTP conversation to stderr`;

const OPTIONS = {
    host: { type: 'string' },
    port: { type: 'string' },
    secure: { type: 'boolean', default: false },
    starttls: { type: 'boolean', default: false },
    user: { type: 'string' },
    pass: { type: 'string' },
    'auth-method': { type: 'string' },
    from: { type: 'string', default: 'sender@example.com' },
    to: { type: 'string', default: 'rcpt@example.com' },
    eml: { type: 'string' },
    subject: { type: 'string' },
    text: { type: 'string' },
    ca: { type: 'string' },
    insecure: { type: 'boolean', default: false },
    servername: { type: 'string' },
    name: { type: 'string', default: 'nodemailer.test' },
    lmtp: { type: 'boolean', default: false },
    timeout: { type: 'string', default: '10000' },
    debug: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false }
};

function usageError(message) {
    process.stderr.write(`send.js: ${message}\n${USAGE}\n`);
    process.exit(2);
}

function parseCommandLine(argv) {
    let values;
    try {
        ({ values } = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false }));
    } catch (err) {
        usageError(err.message);
    }
    if (values.help) {
        process.stdout.write(`${USAGE}\n`);
        process.exit(0);
    }
    if (!values.host || !values.port) usageError('--host and --port are required');
    const port = Number(values.port);
    if (!Number.isInteger(port) || port < 1 || port > 65535) usageError(`bad --port ${values.port}`);
    const timeout = Number(values.timeout);
    if (!Number.isFinite(timeout) || timeout <= 0) usageError(`bad --timeout ${values.timeout}`);
    if (values.secure && values.starttls) usageError('--secure and --starttls exclude each other');
    if ((values.user === undefined) !== (values.pass === undefined)) usageError('--user and --pass go together');
    if (values.ca && values.insecure) usageError('--ca and --insecure exclude each other');
    if (values.eml && (values.subject !== undefined || values.text !== undefined)) {
        usageError('--eml excludes --subject/--text');
    }
    const to = values.to.split(',').map((s) => s.trim()).filter(Boolean);
    if (to.length === 0) usageError('--to needs at least one address');
    return { ...values, port, timeout, to };
}

// nodemailer's logger interface, pointed at stderr so stdout stays one JSON line.
function stderrLogger() {
    const log = (level) => (_meta, ...args) => {
        process.stderr.write(`[${level}] ${format(...args)}\n`);
    };
    return Object.fromEntries(['trace', 'debug', 'info', 'warn', 'error', 'fatal'].map((l) => [l, log(l)]));
}

function transportOptions(opts) {
    // SNI must not carry an IP address (RFC 6066); node then verifies against the host.
    const tls = {};
    const servername = opts.servername || (net.isIP(opts.host) ? undefined : opts.host);
    if (servername) tls.servername = servername;
    if (opts.ca) tls.ca = fs.readFileSync(opts.ca);
    if (opts.insecure) tls.rejectUnauthorized = false;
    const transport = {
        host: opts.host,
        port: opts.port,
        name: opts.name,
        lmtp: opts.lmtp,
        secure: opts.secure,
        requireTLS: opts.starttls,
        // Without an explicit TLS flag, stay plaintext: a test must know which it gets.
        ignoreTLS: !opts.secure && !opts.starttls,
        tls,
        connectionTimeout: opts.timeout,
        greetingTimeout: opts.timeout,
        socketTimeout: opts.timeout
    };
    if (opts.user !== undefined) {
        transport.auth = { user: opts.user, pass: opts.pass };
        if (opts['auth-method']) transport.authMethod = opts['auth-method'].toUpperCase();
    }
    if (opts.debug) {
        transport.logger = stderrLogger();
        transport.debug = true;
    }
    return transport;
}

function message(opts) {
    if (opts.eml) {
        return { envelope: { from: opts.from, to: opts.to }, raw: fs.readFileSync(opts.eml) };
    }
    return {
        from: opts.from,
        to: opts.to,
        subject: opts.subject ?? 'mailgate interop test',
        text: opts.text ?? 'Hello from nodemailer.\n'
    };
}

function errorReport(err) {
    const report = { ok: false, error: err.message };
    for (const key of ['code', 'command', 'response', 'responseCode', 'rejected']) {
        if (err[key] !== undefined) report[key] = err[key];
    }
    if (Array.isArray(err.rejectedErrors)) {
        report.rejectedErrors = err.rejectedErrors.map((e) => ({
            recipient: e.recipient,
            response: e.response,
            responseCode: e.responseCode
        }));
    }
    return report;
}

async function main() {
    const opts = parseCommandLine(process.argv.slice(2));
    let mail;
    try {
        mail = message(opts);
    } catch (err) {
        usageError(err.message);
    }
    const transporter = nodemailer.createTransport(transportOptions(opts));
    try {
        const info = await transporter.sendMail(mail);
        process.stdout.write(
            `${JSON.stringify({
                ok: true,
                accepted: info.accepted,
                rejected: info.rejected,
                envelope: info.envelope,
                messageId: info.messageId,
                response: info.response
            })}\n`
        );
        return 0;
    } catch (err) {
        process.stdout.write(`${JSON.stringify(errorReport(err))}\n`);
        return 1;
    } finally {
        transporter.close();
    }
}

main().then(
    (code) => {
        process.exitCode = code;
    },
    (err) => {
        process.stdout.write(`${JSON.stringify({ ok: false, error: String((err && err.stack) || err) })}\n`);
        process.exitCode = 1;
    }
);
