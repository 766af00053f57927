#!/usr/bin/env node
// The Telephony channel's side of the Bot Framework streaming protocol, played by
// Microsoft's own botframework-streaming library so that our bot is tested against code we
// did not write. tests/jspeer.py drives it: one JSON command per line on stdin, one JSON
// event per line on stdout (stderr is for debugging only):
//   connect {socket,url,headers,trace?} -> connected | refused {status,body} | error {message}
//   send {socket,rid,verb,path,body?,framing: library|merged|split} -> response {rid,status,body} | send_failed
//   raw {socket,messages: [base64]} -> raw_sent {failed}
//   answer {socket,mode: {status,delay_ms,provisional,silent,close_after,close_code}} -> log answer_set
//   close {socket,code} / cut {socket} -> disconnected {code}
//   unsolicited: request {socket,id,verb,path,body,bytes} (each bot request, before answering),
//   message {socket,size,base64} (trace), log {what,...}, error {cmd,message} (a bad command).
//
// The library's WebSocketClient cannot send headers (Authorization, channelid), so each
// socket is opened here with `ws` and the session is assembled from the library's own
// classes exactly as WebSocketClient.connect does: NodeWebSocket -> WebSocketTransport ->
// PayloadSender/PayloadReceiver -> ProtocolAdapter with a RequestManager.
'use strict';

const crypto = require('crypto');
const readline = require('readline');
const WebSocket = require('ws');
const { StreamingRequest, StreamingResponse } = require('botframework-streaming');
const { NodeWebSocket } = require('botframework-streaming/lib/webSocket/nodeWebSocket');
const { WebSocketTransport } = require('botframework-streaming/lib/webSocket/webSocketTransport');
const { ProtocolAdapter } = require('botframework-streaming/lib/protocolAdapter');
const { RequestManager } = require('botframework-streaming/lib/payloads/requestManager');
const { HeaderSerializer } = require('botframework-streaming/lib/payloads/headerSerializer');
const { PayloadTypes } = require('botframework-streaming/lib/payloads/payloadTypes');
const { PayloadConstants } = require('botframework-streaming/lib/payloads/payloadConstants');
const {
    PayloadSender,
    PayloadReceiver,
    TransportDisconnectedEvent,
} = require('botframework-streaming/lib/payloadTransport');

const JSON_TYPE = 'application/json; charset=utf-8';
const SPLIT_SIZE = 7; // bytes per WebSocket message for framing "split"

function emit(event) {
    process.stdout.write(JSON.stringify(event) + '\n');
}

function debug(...args) {
    process.stderr.write(`[channel.js] ${args.join(' ')}\n`);
}

function errorMessage(err) {
    if (err instanceof Error) return err.message;
    return typeof err === 'string' ? err : JSON.stringify(err);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Body text as JSON when it parses, else the text itself; null for no body at all.
function parseBody(text) {
    if (text === null || text === undefined) return null;
    try {
        return JSON.parse(text);
    } catch (_err) {
        return text;
    }
}

// Reads every stream of a received request or response (ContentStream.readAsString waits
// until the declared length has arrived: a body shorter than declared never completes).
async function readStreams(streams) {
    if (!streams || streams.length === 0) return { text: null, bytes: 0, contentType: null };
    const texts = [];
    let bytes = 0;
    for (const stream of streams) {
        const { bufferArray, size } = await stream.readAll();
        bytes += size;
        texts.push(Buffer.concat(bufferArray || []).toString('utf8'));
    }
    return { text: texts.join(''), bytes, contentType: streams[0].contentType ?? null };
}

function header(payloadType, payloadLength, id, end) {
    const buffer = Buffer.alloc(PayloadConstants.MaxHeaderLength);
    HeaderSerializer.serialize({ payloadType, payloadLength, id, end }, buffer);
    return buffer;
}

// Header + payload pieces for one payload, cut at MaxPayloadLength as PayloadSender does.
function framed(payloadType, id, payload) {
    const parts = [];
    for (let offset = 0; offset < payload.length; offset += PayloadConstants.MaxPayloadLength) {
        const chunk = payload.subarray(offset, offset + PayloadConstants.MaxPayloadLength);
        const last = offset + chunk.length >= payload.length;
        parts.push(header(payloadType, chunk.length, id, last), chunk);
    }
    return parts;
}

class Session {
    constructor(name, url, headers, trace) {
        this.name = name;
        this.mode = { status: 200 };
        this.closeAfter = null; // bot requests still to receive before closing, from mode.close_after
        this.opened = false;
        this.refused = false;
        this.ws = new WebSocket(url, { headers, perMessageDeflate: false });
        this.ws.on('unexpected-response', (req, res) => this.onRefused(req, res));
        this.ws.on('error', (err) => {
            if (this.refused) return;
            if (this.opened) emit({ event: 'log', socket: name, what: 'socket_error', message: errorMessage(err) });
            else emit({ event: 'error', socket: name, message: errorMessage(err) });
        });
        this.ws.on('close', (code, reason) => {
            if (!this.opened) return;
            emit({ event: 'disconnected', socket: name, code: code ?? null, reason: reason.toString('utf8') });
        });
        if (trace) {
            this.ws.on('message', (data, isBinary) => {
                const buffer = Buffer.isBuffer(data) ? data : Buffer.concat(data);
                emit({ event: 'message', socket: name, binary: isBinary, size: buffer.length, base64: buffer.toString('base64') });
            });
        }
        this.ws.on('open', () => this.onOpen());
    }

    onRefused(_req, res) {
        this.refused = true;
        const chunks = [];
        res.on('data', (chunk) => chunks.push(chunk));
        res.on('end', () => {
            emit({
                event: 'refused',
                socket: this.name,
                status: res.statusCode,
                body: Buffer.concat(chunks).toString('utf8'),
            });
            this.ws.terminate(); // aborts the handshake: CLOSED, so the name can be reused
        });
        res.on('error', () => this.ws.terminate());
    }

    // What WebSocketClient's constructor and connect() do, on our own ws socket.
    onOpen() {
        this.opened = true;
        this.down = false;
        this.requestManager = new RequestManager();
        this.sender = new PayloadSender();
        this.receiver = new PayloadReceiver();
        this.sender.disconnected = (sender, event) => this.onDisconnected('sender', event);
        this.receiver.disconnected = (receiver, event) => this.onDisconnected('receiver', event);
        const handler = { processRequest: async () => null };
        this.adapter = new ProtocolAdapter(handler, this.requestManager, this.sender, this.receiver);
        // PayloadAssemblerManager calls adapter.onReceiveRequest(id, request) through a
        // closure, so replacing it here hands us the request id that a provisional
        // (e.g. 202) and a final response must both carry; RequestHandler never sees it.
        this.adapter.onReceiveRequest = (id, request) => this.onBotRequest(id, request);
        this.transport = new WebSocketTransport(new NodeWebSocket(this.ws));
        this.sender.connect(this.transport);
        this.receiver.connect(this.transport);
        emit({ event: 'connected', socket: this.name });
    }

    // As WebSocketClient.onConnectionDisconnected: pending requests fail, and (as
    // WebSocketServer does) the other half goes down too.
    // Once only: a half's `disconnected` fires before that half clears its transport, so
    // calling the other half from here without the flag recurses until the stack
    // overflows (what the library's own WebSocketServer.onConnectionDisconnected does).
    onDisconnected(half, event) {
        if (this.down) return;
        this.down = true;
        const reason = (event && event.reason) || 'Disconnected';
        emit({ event: 'log', socket: this.name, what: 'library_disconnected', half, reason });
        this.requestManager.rejectAllResponses(new Error(`Disconnected: ${reason}`));
        const other = half === 'sender' ? this.receiver : this.sender;
        if (other.isConnected) other.disconnect(new TransportDisconnectedEvent(reason));
    }

    get isOpen() {
        return this.opened && this.ws.readyState === WebSocket.OPEN;
    }

    async onBotRequest(id, request) {
        let body;
        try {
            body = await readStreams(request.streams);
        } catch (err) {
            emit({ event: 'log', socket: this.name, what: 'request_unreadable', id, message: errorMessage(err) });
            return;
        }
        emit({
            event: 'request',
            socket: this.name,
            id,
            verb: request.verb,
            path: request.path,
            body: parseBody(body.text),
            bytes: body.bytes,
            content_type: body.contentType,
        });
        const mode = this.mode;
        if (this.closeAfter !== null) {
            this.closeAfter -= 1;
            if (this.closeAfter <= 0) {
                this.closeAfter = null;
                emit({ event: 'log', socket: this.name, what: 'closing', id, reason: 'close_after' });
                this.ws.close(mode.close_code ?? 1000);
                return;
            }
        }
        if (mode.silent) return;
        const status = mode.status ?? 200;
        if (mode.provisional) {
            await this.respond(id, StreamingResponse.create(mode.provisional), request);
        }
        if (mode.delay_ms) await sleep(mode.delay_ms);
        const response = StreamingResponse.create(status);
        if (status >= 200 && status < 300) response.setBody({ id: crypto.randomUUID() });
        await this.respond(id, response, request);
    }

    async respond(id, response, request) {
        // The library's transport drops writes on a closed socket without a word: say so.
        if (!this.isOpen) {
            emit({ event: 'log', socket: this.name, what: 'answer_dropped', id, status: response.statusCode });
            return;
        }
        await this.adapter.sendOperations.sendResponse(id, response);
        emit({ event: 'log', socket: this.name, what: 'answered', id, path: request.path, status: response.statusCode });
    }

    setMode(mode) {
        this.mode = { status: 200, ...mode };
        this.closeAfter = Number.isInteger(mode.close_after) ? mode.close_after : null;
    }

    async send(cmd) {
        const { rid } = cmd;
        const verb = cmd.verb || 'POST';
        const path = cmd.path || '/api/messages';
        const framing = cmd.framing || 'library';
        if (!this.isOpen) throw new Error(`socket ${this.name} is not open`);
        let response;
        if (framing === 'library') {
            const request = StreamingRequest.create(verb, path, cmd.body === undefined ? undefined : JSON.stringify(cmd.body));
            response = await this.adapter.sendRequest(request);
        } else if (framing === 'merged' || framing === 'split') {
            const id = crypto.randomUUID();
            const parts = [];
            const streams = [];
            let bodyBuffer = null;
            if (cmd.body !== undefined) {
                bodyBuffer = Buffer.from(JSON.stringify(cmd.body), 'utf8');
                streams.push({ id: crypto.randomUUID(), type: JSON_TYPE, length: bodyBuffer.length });
            }
            parts.push(...framed(PayloadTypes.request, id, Buffer.from(JSON.stringify({ verb, path, streams }), 'utf8')));
            if (bodyBuffer) parts.push(...framed(PayloadTypes.stream, streams[0].id, bodyBuffer));
            const bytes = Buffer.concat(parts);
            // Registered before writing, as ProtocolAdapter.sendRequest does, so a quick
            // answer is not missed; the library then reads the bot's response as usual.
            const pending = this.requestManager.getResponse(id);
            pending.catch(() => {}); // a write failure below must not leave it unhandled
            const messages = [];
            if (framing === 'merged') messages.push(bytes);
            else for (let offset = 0; offset < bytes.length; offset += SPLIT_SIZE) messages.push(bytes.subarray(offset, offset + SPLIT_SIZE));
            await this.writeAll(messages);
            response = await pending;
        } else {
            throw new Error(`unknown framing ${JSON.stringify(framing)}`);
        }
        const body = await readStreams(response.streams);
        emit({
            event: 'response',
            rid,
            socket: this.name,
            status: response.statusCode,
            body: parseBody(body.text),
            content_type: body.contentType,
        });
    }

    // Each buffer as its own binary WebSocket message; resolves once all are written.
    writeAll(buffers) {
        return Promise.all(
            buffers.map(
                (buffer) =>
                    new Promise((resolve, reject) => {
                        this.ws.send(buffer, { binary: true }, (err) => (err ? reject(err) : resolve()));
                    })
            )
        );
    }
}

const sessions = new Map();

function session(name) {
    const found = sessions.get(name);
    if (!found) throw new Error(`unknown socket ${JSON.stringify(name)}`);
    return found;
}

async function handle(cmd) {
    switch (cmd.cmd) {
        case 'connect': {
            const existing = sessions.get(cmd.socket);
            if (existing && !existing.refused && existing.ws.readyState !== WebSocket.CLOSED) throw new Error(`socket ${cmd.socket} is still in use`);
            sessions.set(cmd.socket, new Session(cmd.socket, cmd.url, cmd.headers || {}, !!cmd.trace));
            return;
        }
        case 'send': {
            try {
                await session(cmd.socket).send(cmd);
            } catch (err) {
                emit({ event: 'send_failed', rid: cmd.rid, socket: cmd.socket, message: errorMessage(err) });
            }
            return;
        }
        case 'raw': {
            const s = session(cmd.socket);
            // The bot may well close the socket on the first bad message: report how many
            // writes failed (all, on a closed socket) rather than failing the command.
            const results = await Promise.allSettled((cmd.messages || []).map((m) => s.writeAll([Buffer.from(m, 'base64')])));
            const failed = results.filter((r) => r.status === 'rejected');
            const event = { event: 'raw_sent', socket: cmd.socket, failed: failed.length };
            if (failed.length) event.message = errorMessage(failed[0].reason);
            emit(event);
            return;
        }
        case 'answer': {
            const s = session(cmd.socket);
            s.setMode(cmd.mode || {});
            emit({ event: 'log', socket: cmd.socket, what: 'answer_set', mode: s.mode });
            return;
        }
        case 'close':
            session(cmd.socket).ws.close(cmd.code ?? 1000, cmd.reason);
            return;
        case 'cut':
            // ws.terminate() destroys the TCP socket: no close frame is sent.
            session(cmd.socket).ws.terminate();
            return;
        default:
            throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
    }
}

// The library leaves some rejections unhandled (PayloadAssembler.process(...).then().catch()
// has no handler): report them instead of letting Node end the process.
process.on('unhandledRejection', (reason) => {
    debug('unhandled rejection:', reason && reason.stack ? reason.stack : errorMessage(reason));
    emit({ event: 'log', what: 'unhandled_rejection', message: errorMessage(reason) });
});
process.on('uncaughtException', (err) => {
    debug('uncaught exception:', err && err.stack ? err.stack : errorMessage(err));
    emit({ event: 'log', what: 'uncaught_exception', message: errorMessage(err) });
});

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
    if (!line.trim()) return;
    let cmd;
    try {
        cmd = JSON.parse(line);
    } catch (err) {
        emit({ event: 'error', message: `bad command line: ${errorMessage(err)}` });
        return;
    }
    handle(cmd).catch((err) => emit({ event: 'error', socket: cmd.socket, cmd: cmd.cmd, message: errorMessage(err) }));
});

// stdin closed: close every open socket cleanly (1001 going away), then exit.
lines.on('close', async () => {
    const open = [...sessions.values()].filter((s) => s.ws.readyState !== WebSocket.CLOSED);
    await Promise.race([
        Promise.all(
            open.map(
                (s) =>
                    new Promise((resolve) => {
                        s.ws.once('close', resolve);
                        if (s.ws.readyState === WebSocket.CONNECTING) s.ws.terminate();
                        else s.ws.close(1001);
                    })
            )
        ),
        sleep(2000),
    ]);
    for (const s of open) if (s.ws.readyState !== WebSocket.CLOSED) s.ws.terminate();
    process.exit(0);
});
