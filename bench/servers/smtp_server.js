#!/usr/bin/env node
// nodemailer's smtp-server as the benchmark runs it: a sink that reads each message to the
// end and answers 250 without keeping it.
//
//   node bench/servers/smtp_server.js --port 2525 [--no-greeting-wait]
//
// smtp-server holds every new connection 100 ms before its 220 greeting, to catch clients
// that talk first (SMTPConnection.prototype.init: `setTimeout(() => this.connectionReady(),
// 100)`). It has no option for this, so --no-greeting-wait replaces init() with one that
// greets as soon as the socket is set up; that isolates the engine from the fixed wait.
// Reverse DNS of the client is off in both variants (disableReverseLookup), as the other
// servers in the benchmark do no per-connection lookup either.
'use strict';

const path = require('node:path');
const { createRequire } = require('node:module');
const { parseArgs } = require('node:util');

const { values: args } = parseArgs({
    options: {
        host: { type: 'string', default: '127.0.0.1' },
        port: { type: 'string' },
        'no-greeting-wait': { type: 'boolean', default: false },
        'node-modules': { type: 'string' }
    }
});
if (!args.port) {
    process.stderr.write('usage: node smtp_server.js --port N [--no-greeting-wait]\n');
    process.exit(2);
}

// smtp-server lives in bench/.work/node (installed by bench/setup.sh), not next to this file.
const nodeDir = args['node-modules'] || path.join(__dirname, '..', '.work', 'node');
const requireBench = createRequire(path.join(nodeDir, 'package.json'));
const { SMTPServer } = requireBench('smtp-server');

if (args['no-greeting-wait']) {
    const { SMTPConnection } = requireBench('smtp-server/lib/smtp-connection.js');
    SMTPConnection.prototype.init = function initWithoutWait() {
        this._setListeners(() => this.connectionReady());
    };
}

const server = new SMTPServer({
    name: 'bench',
    logger: false,
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    disableReverseLookup: true,
    onData(stream, _session, callback) {
        stream.on('end', () => callback());
        stream.resume();
    }
});
server.on('error', (err) => process.stderr.write(`smtp-server error: ${err.message}\n`));

// Nothing is kept, so there is nothing to drain: exit at once.
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

server.listen(Number(args.port), args.host);
