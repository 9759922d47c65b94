#!/usr/bin/env node
// A paramsel client in plain JavaScript (Node >= 18): proof that the contract in proto/paramsel/v1 is
// usable from a language other than Python, with nothing but the .proto files and docs/clients.md.
//
//   node client.js --target 127.0.0.1:50051
//
//   node client.js --target 127.0.0.1:50051 --emit aggregate.json
//
// It builds a small model and an initial model, streams both to Select (top-k, COMPACT positions),
// decodes the sparse reply (Elias-Fano and bitmap positions), then a layer selection that names the
// initial model by digest only, and one bad request; every answer is checked against what this script
// computes itself. Then the rules the proto states for Aggregate, Pull and top-k: the same
// contributions sent in different orders aggregate to the same bytes (the server sorts them as
// FL4Health does; with --emit, the contributions and the answers are written out, in the order they
// were generated, so that tests/test_node_client.py can aggregate them with the Python SDK and compare
// the bytes), ties in the sort key keep arrival order, COMPACT ties go to ELIAS_FANO, k = ceil(N x s)
// in double, scatter sums duplicate positions and replaces, Pull returns every named tensor; and a top-k
// by scores of its own (SCORE_FUNCTION_SUPPLIED), through Select and Push, and a refusal.
// Exit status 0 only when every check passed.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const REQUEST_CHUNK_BYTES = 4096; // small on purpose: the 64x32 weight (8 KiB) spans several chunks
const RESPONSE_CHUNK_BYTES = 512; // likewise for the replies
const DEADLINE_MS = 30000;

// --- the contract -------------------------------------------------------------------------------------

function loadService() {
  const definition = protoLoader.loadSync('paramsel/v1/service.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String, // int64 / uint64 arrive as decimal strings: no silent precision loss
    enums: String, // enum values arrive as their names
    defaults: true,
    oneofs: true, // each oneof arrives as a property naming the field that is set (e.g. msg.frame)
  });
  return grpc.loadPackageDefinition(definition).paramsel.v1.ParameterSelectionService;
}

// Number of the DataType enum (the digest hashes it), item size, and a little-endian reader per dtype.
const DTYPES = {
  DATA_TYPE_FLOAT32: { number: 1, size: 4, read: (v, o) => v.getFloat32(o, true), write: (b, x, o) => b.writeFloatLE(x, o) },
  DATA_TYPE_FLOAT64: { number: 2, size: 8, read: (v, o) => v.getFloat64(o, true), write: (b, x, o) => b.writeDoubleLE(x, o) },
  DATA_TYPE_INT64: { number: 5, size: 8, read: (v, o) => v.getBigInt64(o, true) },
  DATA_TYPE_INT32: { number: 6, size: 4, read: (v, o) => v.getInt32(o, true) },
};

function int64(value, what) {
  // longs: String gives decimal strings; every count here must fit a JS number exactly.
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw new Error(`${what} = ${value} is not a safe integer`);
  return n;
}

const numelOf = (shape) => shape.reduce((a, b) => a * b, 1);

// --- a model ------------------------------------------------------------------------------------------

// mulberry32: a tiny seeded PRNG, so every run builds the same model.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// A tensor: { name, dtype, shape, values (Float32Array or BigInt64Array), bytes (Buffer, LE row-major) }.
function tensor(name, dtype, shape, values) {
  const { size, write } = DTYPES[dtype];
  const bytes = Buffer.alloc(values.length * size);
  values.forEach((x, i) => {
    if (write) write(bytes, x, size * i);
    else bytes.writeBigInt64LE(x, 8 * i);
  });
  return { name, dtype, shape, values, bytes };
}

function buildModels() {
  const rand = prng(20240601);
  const uniform = (lo, hi) => lo + (hi - lo) * rand();
  const w0 = Float32Array.from({ length: 64 * 32 }, () => uniform(-1, 1));
  const w = w0.map((x) => x + uniform(-0.1, 0.1));
  for (let i = 0; i < w.length; i += 97) w[i] = 0; // big changes whose new value is 0: selected, not sent
  const b0 = Float32Array.from({ length: 32 }, () => uniform(-1, 1));
  const b = b0.map((x) => x + uniform(-0.3, 0.3));
  const initial = [
    tensor('fc.weight', 'DATA_TYPE_FLOAT32', [64, 32], w0),
    tensor('fc.bias', 'DATA_TYPE_FLOAT32', [32], b0),
    tensor('steps', 'DATA_TYPE_INT64', [], BigInt64Array.from([41n])),
  ];
  const model = [
    tensor('fc.weight', 'DATA_TYPE_FLOAT32', [64, 32], w),
    tensor('fc.bias', 'DATA_TYPE_FLOAT32', [32], b),
    tensor('steps', 'DATA_TYPE_INT64', [], BigInt64Array.from([42n])),
  ];
  return { model, initial };
}

// ModelDigest.sha256: per tensor in state order, uint32 LE name length, UTF-8 name, uint32 LE DataType,
// uint32 LE ndim, int64 LE dims, then the data bytes as they travel.
function modelDigest(tensors) {
  const hash = crypto.createHash('sha256');
  for (const t of tensors) {
    const name = Buffer.from(t.name, 'utf8');
    const head = Buffer.alloc(12 + 8 * t.shape.length);
    head.writeUInt32LE(name.length, 0);
    head.writeUInt32LE(DTYPES[t.dtype].number, 4);
    head.writeUInt32LE(t.shape.length, 8);
    t.shape.forEach((d, i) => head.writeBigInt64LE(BigInt(d), 12 + 8 * i));
    hash.update(head.subarray(0, 4));
    hash.update(name);
    hash.update(head.subarray(4));
    hash.update(t.bytes);
  }
  return hash.digest();
}

// --- request streams ----------------------------------------------------------------------------------

const specOf = (t) => ({ name: t.name, dtype: t.dtype, shape: t.shape.map(String) });

// The frames of a Select request: start, every manifest, then each section's bytes in chunks.
function* selectFrames(start, sections) {
  yield { start };
  for (const [section, tensors] of sections) yield { tensors: { section, tensors: tensors.map(specOf) } };
  for (const [section, tensors] of sections) {
    const data = Buffer.concat(tensors.map((t) => t.bytes));
    for (let offset = 0; offset < data.length; offset += REQUEST_CHUNK_BYTES) {
      const piece = data.subarray(offset, offset + REQUEST_CHUNK_BYTES);
      yield { chunk: { section, offset_bytes: String(offset), data: piece } };
    }
  }
}

// Runs one bidirectional call: writes the frames (honouring back-pressure), collects the replies.
function call(client, method, frames) {
  return new Promise((resolve, reject) => {
    const replies = [];
    const stream = client[method](new grpc.Metadata(), { deadline: Date.now() + DEADLINE_MS });
    stream.on('data', (frame) => replies.push(frame));
    stream.on('error', reject);
    stream.on('end', () => resolve(replies));
    const iterator = frames[Symbol.iterator]();
    const pump = () => {
      for (let next = iterator.next(); !next.done; next = iterator.next()) {
        if (!stream.write(next.value)) return stream.once('drain', pump);
      }
      stream.end();
    };
    pump();
  });
}

// --- response streams ---------------------------------------------------------------------------------

// Splits a response into header, manifests and the reassembled SECTION_RESULT bytes, checking the frame
// order (header first, every manifest before the first chunk) and the chunk offsets.
function reassemble(replies) {
  const [first, ...rest] = replies;
  if (!first || first.frame !== 'header') throw new Error('the response does not start with a header');
  const manifests = { dense: [], sparse: [] };
  const pieces = [];
  let received = 0;
  for (const reply of rest) {
    if (reply.frame === 'chunk') {
      const { section, offset_bytes: offset, data } = reply.chunk;
      if (section !== 'SECTION_RESULT') throw new Error(`chunk of ${section}`);
      if (int64(offset, 'offset_bytes') !== received) throw new Error(`chunk at ${offset}, expected ${received}`);
      pieces.push(data);
      received += data.length;
    } else if (pieces.length) {
      throw new Error(`a ${reply.frame} frame after the first chunk`);
    } else if (reply.frame === 'sparse_tensors') {
      manifests.sparse.push(...reply.sparse_tensors.tensors);
    } else if (reply.frame === 'tensors') {
      manifests.dense.push(...reply.tensors.tensors);
    } else {
      throw new Error(`unexpected ${reply.frame} frame`);
    }
  }
  return { header: first.header, manifests, data: Buffer.concat(pieces), chunks: pieces.length };
}

function readValues(data, offset, dtype, count) {
  const { size, read } = DTYPES[dtype];
  const view = new DataView(data.buffer, data.byteOffset + offset, count * size);
  const out = [];
  for (let i = 0; i < count; i++) out.push(read(view, i * size));
  return out;
}

// BITMAP: ceil(numel / 8) bytes; bit p (byte p >> 3, bit p & 7 from the least significant) set when
// position p is sent.
function decodeBitmap(bytes, nnz, numel) {
  if (bytes.length !== Math.ceil(numel / 8)) throw new Error(`BITMAP of ${bytes.length} bytes for ${numel}`);
  const positions = [];
  for (let p = 0; p < numel; p++) if ((bytes[p >> 3] >> (p & 7)) & 1) positions.push(p);
  if (positions.length !== nnz) throw new Error(`BITMAP has ${positions.length} bits set, nnz is ${nnz}`);
  return positions;
}

// Elias-Fano layout of n positions among U: L low bits, low bytes, high bits.
function eliasFanoLayout(n, U) {
  let L = 0;
  while (n * 2 ** (L + 1) <= U) L++; // the largest L with n * 2^L <= U, i.e. floor(log2(U / n))
  return { L, lowBytes: Math.ceil((n * L) / 8), highBits: n + Math.floor((U - 1) / 2 ** L) + 1 };
}

// ELIAS_FANO: n fields of L bits (least significant bit first), then a bitmap with bit (p_i >> L) + i set.
function decodeEliasFano(bytes, nnz, numel) {
  if (nnz === 0) return [];
  const { L, lowBytes, highBits } = eliasFanoLayout(nnz, numel);
  if (bytes.length !== lowBytes + Math.ceil(highBits / 8)) throw new Error('ELIAS_FANO size mismatch');
  const bit = (b) => (bytes[b >> 3] >> (b & 7)) & 1;
  const positions = [];
  let i = 0;
  for (let b = 0; b < highBits && i < nnz; b++) {
    if (!bit(8 * lowBytes + b)) continue;
    let low = 0;
    for (let j = 0; j < L; j++) low += bit(i * L + j) * 2 ** j;
    positions.push((b - i) * 2 ** L + low);
    i++;
  }
  if (i !== nnz) throw new Error(`ELIAS_FANO high part holds ${i} positions, nnz is ${nnz}`);
  for (let j = 1; j < nnz; j++) {
    if (positions[j] <= positions[j - 1]) throw new Error('ELIAS_FANO positions not increasing');
  }
  if (positions[nnz - 1] >= numel) throw new Error('ELIAS_FANO position out of range');
  return positions;
}

// The sparse tensors of a SELECTION_KIND_SPARSE_COO result: [{ name, encoding, entries: [[pos, value]] }].
function decodeSparse(specs, data) {
  let offset = 0;
  return specs.map((spec) => {
    const shape = spec.shape.map((d) => int64(d, 'shape'));
    const nnz = int64(spec.nnz, 'nnz');
    const positionsBytes = int64(spec.positions_size_bytes, 'positions_size_bytes');
    const values = readValues(data, offset, spec.dtype, nnz);
    offset += nnz * DTYPES[spec.dtype].size;
    const code = data.subarray(offset, offset + positionsBytes);
    offset += positionsBytes;
    const numel = numelOf(shape);
    let positions;
    if (spec.position_encoding === 'POSITION_ENCODING_ELIAS_FANO') positions = decodeEliasFano(code, nnz, numel);
    else if (spec.position_encoding === 'POSITION_ENCODING_BITMAP') positions = decodeBitmap(code, nnz, numel);
    else throw new Error(`${spec.name}: unexpected ${spec.position_encoding}`);
    const smaller = Math.min(Math.ceil(numel / 8), efBytes(nnz, numel));
    if (positionsBytes !== smaller) throw new Error(`${spec.name}: COMPACT sent ${positionsBytes} B, not ${smaller}`);
    return { name: spec.name, encoding: spec.position_encoding, entries: positions.map((p, i) => [p, values[i]]) };
  });
}

function efBytes(n, U) {
  if (n === 0) return 0;
  const { lowBytes, highBits } = eliasFanoLayout(n, U);
  return lowBytes + Math.ceil(highBits / 8);
}

function decodeDense(specs, data) {
  let offset = 0;
  return specs.map((spec) => {
    const numel = numelOf(spec.shape.map((d) => int64(d, 'shape')));
    const values = readValues(data, offset, spec.dtype, numel);
    offset += numel * DTYPES[spec.dtype].size;
    return { name: spec.name, dtype: spec.dtype, values };
  });
}

// --- the expected answers, computed here --------------------------------------------------------------

// |w - w0| per entry, in the tensor's dtype (float32 rounding for float32 tensors).
function scores(model, initial) {
  return model.map((t, j) => {
    const w0 = initial[j].values;
    if (t.dtype === 'DATA_TYPE_INT64') return Array.from(t.values, (x, i) => Number(x < w0[i] ? w0[i] - x : x - w0[i]));
    return Array.from(t.values, (x, i) => Math.abs(Math.fround(x - w0[i])));
  });
}

function expectedTopK(model, initial, sparsity) {
  const perTensor = scores(model, initial);
  const all = perTensor.flat().sort((a, b) => b - a);
  const k = Math.ceil(all.length * sparsity);
  const threshold = all[k - 1];
  const sent = [];
  let selected = 0;
  model.forEach((t, j) => {
    perTensor[j].forEach((s, p) => {
      if (s < threshold) return;
      selected++;
      const value = Number(t.values[p]);
      if (t.shape.length > 0 && value !== 0) sent.push(`${t.name}@${p}=${value}`);
    });
  });
  return { total: all.length, k, threshold, selected, sent };
}

function expectedLayers(model, initial, percentage) {
  const drifts = model.map((t, j) => {
    const w0 = initial[j].values;
    let sum = 0;
    t.values.forEach((x, i) => {
      const d = t.dtype === 'DATA_TYPE_INT64' ? Number(x - w0[i]) : Math.fround(x - w0[i]);
      sum += d * d;
    });
    return { name: t.name, drift: Math.sqrt(sum) / t.values.length };
  });
  const ranked = [...drifts].sort((a, b) => b.drift - a.drift); // stable: ties keep state order
  return ranked.slice(0, Math.ceil(drifts.length * percentage));
}

// --- checks -------------------------------------------------------------------------------------------

const failures = [];
function check(ok, what) {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
}

async function topKSelection(client, model, initial, digest) {
  const sparsity = 0.1;
  const start = {
    criterion: { top_k: { sparsity_level: sparsity, score_function: 'SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE' } },
    position_encoding: 'POSITION_ENCODING_COMPACT',
    response_chunk_size_bytes: String(RESPONSE_CHUNK_BYTES),
    initial_model_digest: { sha256: digest }, // with the data too: the server checks it and keeps the model
  };
  const sections = [['SECTION_MODEL', model], ['SECTION_INITIAL_MODEL', initial]];
  const reply = reassemble(await call(client, 'Select', selectFrames(start, sections)));
  const want = expectedTopK(model, initial, sparsity);
  const summary = reply.header.top_k;
  check(reply.header.kind === 'SELECTION_KIND_SPARSE_COO', `top-k: kind ${reply.header.kind}`);
  check(int64(summary.total_entries, 'N') === want.total, `top-k: N = ${summary.total_entries}`);
  check(int64(summary.k, 'k') === want.k, `top-k: k = ${summary.k} (expected ${want.k})`);
  check(summary.threshold === want.threshold, `top-k: threshold ${summary.threshold} (expected ${want.threshold})`);
  check(int64(summary.selected_entries, 'selected') === want.selected, `top-k: ${want.selected} entries selected`);
  check(int64(summary.sent_entries, 'sent') === want.sent.length, `top-k: ${want.sent.length} values sent`);
  const tensors = decodeSparse(reply.manifests.sparse, reply.data);
  const got = tensors.flatMap((t) => t.entries.map(([p, v]) => `${t.name}@${p}=${v}`));
  const missing = want.sent.filter((e) => !got.includes(e));
  const extra = got.filter((e) => !want.sent.includes(e));
  check(got.length === want.sent.length && !missing.length && !extra.length,
    `top-k: the (name, position, value) set matches (${missing.length} missing, ${extra.length} extra)`);
  check(!tensors.some((t) => t.name === 'steps'), 'top-k: the 0-d tensor is not sent');
  const encodings = new Set(tensors.map((t) => t.encoding));
  check(encodings.has('POSITION_ENCODING_ELIAS_FANO') && encodings.has('POSITION_ENCODING_BITMAP'),
    `top-k: COMPACT used ${[...encodings].join(' and ')}, decoded in JS`);
  check(reply.chunks > 1, `top-k: the result came in ${reply.chunks} chunks`);
  return tensors;
}

async function layerSelection(client, model, initial, digest) {
  const percentage = 0.5;
  const start = {
    criterion: { drift_percentage: { exchange_percentage: percentage } },
    response_chunk_size_bytes: String(RESPONSE_CHUNK_BYTES),
    initial_model_digest: { sha256: digest }, // no SECTION_INITIAL_MODEL: the server reuses its copy
  };
  const reply = reassemble(await call(client, 'Select', selectFrames(start, [['SECTION_MODEL', model]])));
  const want = expectedLayers(model, initial, percentage);
  const summary = reply.header.layers;
  check(reply.header.kind === 'SELECTION_KIND_LAYERS', `layers: kind ${reply.header.kind}`);
  check(int64(summary.total_layers, 'L') === model.length, `layers: L = ${summary.total_layers}`);
  const tensors = decodeDense(reply.manifests.dense, reply.data);
  check(tensors.map((t) => t.name).join() === want.map((w) => w.name).join(),
    `layers: selected ${tensors.map((t) => t.name).join(', ')} in drift order`);
  const close = (a, b) => Math.abs(a - b) <= 1e-5 * Math.max(Math.abs(a), Math.abs(b));
  check(summary.drifts.length === want.length && want.every((w, i) => close(summary.drifts[i], w.drift)),
    `layers: drifts ${summary.drifts.map((d) => d.toPrecision(6)).join(', ')}`);
  const byName = Object.fromEntries(model.map((t) => [t.name, t]));
  check(tensors.every((t) => t.dtype === byName[t.name].dtype
      && t.values.length === byName[t.name].values.length
      && t.values.every((v, i) => v === byName[t.name].values[i])),
    'layers: every tensor came back whole and equal to the model');
}

async function badRequest(client, model) {
  const start = { criterion: { top_k: { sparsity_level: 0, score_function: 'SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE' } } };
  try {
    await call(client, 'Select', selectFrames(start, [['SECTION_MODEL', model]]));
    check(false, 'sparsity_level 0: the call succeeded');
  } catch (err) {
    check(err.code === grpc.status.INVALID_ARGUMENT && /sparsity_level/.test(err.details),
      `sparsity_level 0: status ${err.code} (INVALID_ARGUMENT is 3): ${err.details}`);
  }
}

// FAILED_PRECONDITION carries a google.rpc.Status in the grpc-status-details-bin trailer; its details hold
// a google.rpc.ErrorInfo. Decoded here with a minimal protobuf reader (fields: varint and length-delimited).
function protoFields(buf) {
  const fields = [];
  let i = 0;
  const varint = () => {
    let v = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = buf[i++];
      v += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return v;
    }
  };
  while (i < buf.length) {
    const key = varint();
    const wire = key & 7;
    if (wire === 0) fields.push([key >>> 3, varint()]);
    else if (wire === 2) {
      const n = varint();
      fields.push([key >>> 3, buf.subarray(i, i + n)]);
      i += n;
    } else throw new Error(`wire type ${wire} in a status detail`);
  }
  return fields;
}

function errorInfoReason(err) {
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return null;
  for (const [number, any] of protoFields(raw)) {
    if (number !== 3) continue; // Status.details: repeated Any
    const parts = Object.fromEntries(protoFields(any));
    if (String(parts[1]) === 'type.googleapis.com/google.rpc.ErrorInfo') return String(Object.fromEntries(protoFields(parts[2]))[1]);
  }
  return null;
}

async function unknownDigest(client, model) {
  const start = {
    criterion: { drift_percentage: { exchange_percentage: 0.5 } },
    initial_model_digest: { sha256: crypto.createHash('sha256').update('no such model').digest() },
  };
  try {
    await call(client, 'Select', selectFrames(start, [['SECTION_MODEL', model]]));
    check(false, 'unknown digest: the call succeeded');
  } catch (err) {
    const reason = errorInfoReason(err);
    check(err.code === grpc.status.FAILED_PRECONDITION && reason === 'INITIAL_MODEL_NOT_HELD',
      `unknown digest: status ${err.code} (FAILED_PRECONDITION is 9), ErrorInfo reason ${reason}`);
  }
}

// --- Aggregate, Pull and top-k rules (proto: Aggregate, PullMode, TopKCriterion, PositionEncoding) --------

// A sparse tensor to send with COO_INT64 positions: values in `dtype`, flat positions in any order
// (repeats allowed), written as (nnz, ndim) int64 coordinates.
function coo(name, dtype, shape, values, flat) {
  const strides = shape.map((_, d) => numelOf(shape.slice(d + 1)));
  const coords = flat.map((p) => strides.map((s, d) => Math.floor(p / s) % shape[d]));
  const positions = Buffer.alloc(8 * flat.length * shape.length);
  coords.flat().forEach((c, i) => positions.writeBigInt64LE(BigInt(c), 8 * i));
  const t = tensor(name, dtype, shape, values);
  return { ...t, flat, coords, positions };
}

const sparseSpecOf = (t) => ({
  name: t.name,
  dtype: t.dtype,
  shape: t.shape.map(String),
  nnz: String(t.values.length),
  position_encoding: 'POSITION_ENCODING_COO_INT64',
  positions_size_bytes: String(t.positions.length),
});

// Chunks of one section's bytes.
function* chunks(section, data, size = REQUEST_CHUNK_BYTES) {
  for (let offset = 0; offset < data.length; offset += size) {
    yield { chunk: { section, offset_bytes: String(offset), data: data.subarray(offset, offset + size) } };
  }
}

// An Aggregate request: start, then per contribution its frame and its manifest, then SECTION_PAYLOAD:
// every contribution's tensors in declaration order (sparse: values, then positions).
function* aggregateFrames(kind, contributions, options = {}) {
  yield {
    start: {
      payload_kind: kind,
      weighted: options.weighted !== false,
      position_encoding: options.encoding || 'POSITION_ENCODING_COO_INT64',
      response_chunk_size_bytes: String(RESPONSE_CHUNK_BYTES),
      averaging: options.averaging || 'AVERAGING_PER_TENSOR',
    },
  };
  const parts = [];
  for (const c of contributions) {
    yield { contribution: { num_examples: String(c.num_examples) } };
    if (kind === 'PAYLOAD_KIND_SPARSE_COO') {
      yield { sparse_tensors: { section: 'SECTION_PAYLOAD', tensors: c.tensors.map(sparseSpecOf) } };
      for (const t of c.tensors) parts.push(t.bytes, t.positions);
    } else {
      yield { tensors: { section: 'SECTION_PAYLOAD', tensors: c.tensors.map(specOf) } };
      for (const t of c.tensors) parts.push(t.bytes);
    }
  }
  yield* chunks('SECTION_PAYLOAD', Buffer.concat(parts));
}

async function aggregate(client, kind, contributions, options) {
  const reply = reassemble(await call(client, 'Aggregate', aggregateFrames(kind, contributions, options)));
  const specs = kind === 'PAYLOAD_KIND_SPARSE_COO' ? reply.manifests.sparse : reply.manifests.dense;
  return { header: reply.header, specs, data: reply.data };
}

// Values of every magnitude, so that the order of the sums decides the last bits.
function wideValue(rand) {
  return (rand() - 0.5) * 10 ** Math.floor(rand() * 10 - 3);
}

function permutation(n, rand) {
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

function sparseContributions(rand) {
  const shapes = { 'fc.weight': [6, 5], 'fc.bias': [7] };
  const contributions = [];
  for (let c = 0; c < 6; c++) {
    const tensors = [];
    for (const [name, shape] of Object.entries(shapes)) {
      const numel = numelOf(shape);
      const flat = permutation(numel, rand).slice(0, 2 + Math.floor(rand() * (numel - 2))); // unsorted
      if (c === 2) flat.push(flat[0]); // a position sent twice: summed
      const dtype = c === 4 && name === 'fc.bias' ? 'DATA_TYPE_FLOAT64' : 'DATA_TYPE_FLOAT32';
      tensors.push(coo(name, dtype, shape, flat.map(() => wideValue(rand)), flat));
    }
    if (c === 3) tensors.push(coo('fc.bias', 'DATA_TYPE_FLOAT32', [7], [wideValue(rand)], [5])); // a name twice
    contributions.push({ num_examples: 1 + Math.floor(rand() * 1000), tensors });
  }
  return contributions;
}

function layerContributions(rand) {
  const contributions = [];
  for (let c = 0; c < 5; c++) {
    const weight = Array.from({ length: 12 }, () => wideValue(rand));
    const bias = Array.from({ length: 3 }, () => wideValue(rand));
    contributions.push({
      num_examples: 1 + Math.floor(rand() * 1000),
      tensors: [
        tensor('fc.weight', 'DATA_TYPE_FLOAT32', [4, 3], weight),
        tensor('fc.bias', c === 1 ? 'DATA_TYPE_FLOAT64' : 'DATA_TYPE_FLOAT32', [3], bias),
      ],
    });
  }
  return contributions;
}

const hex = (b) => Buffer.from(b).toString('hex');

// What --emit writes: the contributions as generated (the SDK's order) and the answer's bytes.
function emitted(contributions, answer, sentOrder) {
  return {
    sent_order: sentOrder,
    contributions: contributions.map((c) => ({
      num_examples: c.num_examples,
      tensors: c.tensors.map((t) => ({
        name: t.name, dtype: t.dtype, shape: t.shape, values: hex(t.bytes), ...(t.coords ? { coords: t.coords } : {}),
      })),
    })),
    answer: answerParts(answer).map(({ spec, values, positions }) => ({
      name: spec.name, dtype: spec.dtype, shape: spec.shape.map(Number), values: hex(values),
      ...(positions ? { positions: hex(positions) } : {}),
    })),
  };
}

// Each answer tensor's values bytes and (sparse) position bytes.
function answerParts({ specs, data }) {
  let offset = 0;
  return specs.map((spec) => {
    const count = spec.nnz !== undefined ? int64(spec.nnz, 'nnz') : numelOf(spec.shape.map((d) => int64(d, 'shape')));
    const values = data.subarray(offset, offset + count * DTYPES[spec.dtype].size);
    offset += values.length;
    if (spec.nnz === undefined) return { spec, values };
    const positions = data.subarray(offset, offset + int64(spec.positions_size_bytes, 'positions_size_bytes'));
    offset += positions.length;
    return { spec, values, positions };
  });
}

const sameAnswer = (a, b) => JSON.stringify(a.specs) === JSON.stringify(b.specs) && a.data.equals(b.data);

async function aggregateOrders(client, emit) {
  const rand = prng(11);
  const out = {};
  for (const [kind, contributions] of [
    ['PAYLOAD_KIND_SPARSE_COO', sparseContributions(rand)],
    ['PAYLOAD_KIND_LAYERS', layerContributions(rand)],
  ]) {
    const label = kind === 'PAYLOAD_KIND_SPARSE_COO' ? 'sparse' : 'layers';
    const shuffled = permutation(contributions.length, rand);
    const answers = [];
    for (const order of [shuffled, [...shuffled].reverse()]) {
      answers.push(await aggregate(client, kind, order.map((i) => contributions[i])));
    }
    check(sameAnswer(answers[0], answers[1]),
      `aggregate ${label}: orders ${shuffled.join('')} and ${[...shuffled].reverse().join('')} give the same bytes (${answers[0].data.length} B)`);
    out[label] = emitted(contributions, answers[0], shuffled);
  }
  if (emit) fs.writeFileSync(emit, JSON.stringify(out));
}

async function aggregateTies(client) {
  // Keys (first value + num_examples): LOW 1.5, A 3, B 3. Unweighted, position 1 sums to
  // (1e8 + 1) - 1e8 = 0 (dropped) when A arrives before B, and to (1e8 - 1e8) + 1 = 1 (1/3) otherwise.
  const low = { num_examples: 1, tensors: [coo('w', 'DATA_TYPE_FLOAT32', [4], [0.5, 1e8], [0, 1])] };
  const a = { num_examples: 2, tensors: [coo('w', 'DATA_TYPE_FLOAT32', [4], [1, 1], [0, 1])] };
  const b = { num_examples: 1, tensors: [coo('w', 'DATA_TYPE_FLOAT32', [4], [2, -1e8], [0, 1])] };
  const run = (order) => aggregate(client, 'PAYLOAD_KIND_SPARSE_COO', order, { weighted: false });
  const [aLowB, lowAB, bALow] = [await run([a, low, b]), await run([low, a, b]), await run([b, a, low])];
  check(sameAnswer(aLowB, lowAB), 'aggregate ties: equal keys keep their arrival order (A before B either way)');
  check(aLowB.specs[0].nnz === '1' && bALow.specs[0].nnz === '2',
    `aggregate ties: tied contributions that differ are the one order-dependent case (nnz ${aLowB.specs[0].nnz} vs ${bALow.specs[0].nnz})`);
}

async function aggregateCompactTie(client) {
  // 16 entries, one sent: BITMAP and ELIAS_FANO both take 2 bytes; the tie goes to ELIAS_FANO.
  const c = {
    num_examples: 1,
    tensors: [coo('tie', 'DATA_TYPE_FLOAT32', [16], [1], [5]), coo('dense', 'DATA_TYPE_FLOAT32', [16], Array(12).fill(1), [...Array(12).keys()])],
  };
  const { specs, data } = await aggregate(client, 'PAYLOAD_KIND_SPARSE_COO', [c], { encoding: 'POSITION_ENCODING_COMPACT' });
  const chosen = Object.fromEntries(specs.map((s) => [s.name, `${s.position_encoding}/${s.positions_size_bytes}`]));
  check(chosen.tie === 'POSITION_ENCODING_ELIAS_FANO/2' && chosen.dense === 'POSITION_ENCODING_BITMAP/2',
    `aggregate COMPACT: tie ${chosen.tie}, dense ${chosen.dense}`);
  const tensors = decodeSparse(specs, data);
  check(tensors[0].entries.join() === '5,1', `aggregate COMPACT: decoded ${tensors[0].entries.join()}`);
}

async function kRounding(client) {
  const rand = prng(5);
  const model = [tensor('w', 'DATA_TYPE_FLOAT32', [10, 10], Array.from({ length: 100 }, () => rand() + 0.5))];
  const start = { criterion: { top_k: { sparsity_level: 0.07, score_function: 'SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE' } } };
  const reply = reassemble(await call(client, 'Select', selectFrames(start, [['SECTION_MODEL', model]])));
  check(reply.header.top_k.k === String(Math.ceil(100 * 0.07)) && reply.header.top_k.k === '8',
    `top-k: k = ceil(100 x 0.07) in double = ${reply.header.top_k.k} (100 * 0.07 = ${100 * 0.07})`);
}

// --- top-k by the caller's own scores (SCORE_FUNCTION_SUPPLIED, SECTION_SCORES) ------------------------

// Worked out by hand: w (2 x 3) and b (2), scored by the caller. N = 8, k = ceil(8 x 0.5) = 4, and the
// scores in decreasing order are 0.9, 0.8, 0.7, 0.6: the threshold is 0.6 as float32, and w[0, 1] (-1),
// w[1, 0] (3), w[1, 1] (0: selected, not sent) and b[1] (8) are selected. No initial model is sent.
async function suppliedScores(client) {
  const model = [
    tensor('w', 'DATA_TYPE_FLOAT32', [2, 3], [0.5, -1, 2, 3, 0, -4]),
    tensor('b', 'DATA_TYPE_FLOAT32', [2], [7, 8]),
  ];
  const scores = [ // in another order than the model's: matched by name
    tensor('b', 'DATA_TYPE_FLOAT32', [2], [0.4, 0.6]),
    tensor('w', 'DATA_TYPE_FLOAT32', [2, 3], [0.1, 0.9, 0.3, 0.8, 0.7, 0.2]),
  ];
  const criterion = { top_k: { sparsity_level: 0.5, score_function: 'SCORE_FUNCTION_SUPPLIED' } };
  const sections = [['SECTION_MODEL', model], ['SECTION_SCORES', scores]];
  const start = { criterion, position_encoding: 'POSITION_ENCODING_COMPACT' };
  const selected = reassemble(await call(client, 'Select', selectFrames(start, sections)));
  const summary = selected.header.top_k;
  const figures = ['total_entries', 'k', 'selected_entries', 'sent_entries'].map((f) => summary[f]).join(' ');
  check(figures === '8 4 4 3' && summary.threshold === Math.fround(0.6),
    `supplied scores: Select N, k, selected, sent = ${figures}, threshold ${summary.threshold}`);
  const sent = decodeSparse(selected.manifests.sparse, selected.data)
    .flatMap((t) => t.entries.map(([p, v]) => `${t.name}@${p}=${v}`));
  check(sent.join(', ') === 'w@1=-1, w@3=3, b@1=8', `supplied scores: Select sent ${sent.join(', ')}`);
  const pushed = reassemble(await call(client, 'Push', selectFrames({ criterion }, sections)));
  const arrays = decodeDense(pushed.manifests.dense, pushed.data).map((t) => `${t.name}=${t.values.join(' ')}`);
  check(arrays.join(', ') === 'w=-1 3, b=8, w=0 1 1 0, b=1, w=2 3, b=2',
    `supplied scores: Push packed values, indices, shapes: ${arrays.join(', ')}`);
  try {
    await call(client, 'Select', selectFrames(start, [['SECTION_MODEL', model], ['SECTION_SCORES', scores.slice(1)]]));
    check(false, 'supplied scores without b: the call succeeded');
  } catch (err) {
    check(err.code === grpc.status.INVALID_ARGUMENT && /SECTION_SCORES has no tensor for 'b'/.test(err.details),
      `supplied scores without b: status ${err.code} (INVALID_ARGUMENT is 3): ${err.details}`);
  }
}

async function pull(client, mode, payload, base) {
  const layout = [
    { name: 'a', dtype: 'DATA_TYPE_FLOAT32', shape: ['3'] },
    { name: 'w', dtype: 'DATA_TYPE_FLOAT32', shape: ['2', '2'] },
    { name: 'z', dtype: 'DATA_TYPE_FLOAT32', shape: ['2'] },
  ];
  function* frames() {
    yield { start: { payload_kind: 'PAYLOAD_KIND_SPARSE_COO', mode } };
    yield { layout: { tensors: layout } };
    yield { sparse_tensors: { section: 'SECTION_PAYLOAD', tensors: payload.map(sparseSpecOf) } };
    if (base.length) yield { tensors: { section: 'SECTION_BASE', tensors: base.map(specOf) } };
    yield* chunks('SECTION_PAYLOAD', Buffer.concat(payload.flatMap((t) => [t.bytes, t.positions])));
    if (base.length) yield* chunks('SECTION_BASE', Buffer.concat(base.map((t) => t.bytes)));
  }
  const reply = reassemble(await call(client, 'Pull', frames()));
  const got = decodeDense(reply.manifests.dense, reply.data).map((t) => `${t.name}=${t.values.join(' ')}`).join(', ');
  return { count: reply.header.changed_tensors, got };
}

async function pullRules(client) {
  // z sends nothing; w sends 1 and 3 for position 3 and 2 for position 0.
  const payload = [coo('z', 'DATA_TYPE_FLOAT32', [2], [], []), coo('w', 'DATA_TYPE_FLOAT32', [2, 2], [1, 2, 3], [3, 0, 3])];
  const replaced = await pull(client, 'PULL_MODE_REPLACE', payload, []);
  check(replaced.count === '2' && replaced.got === 'z=0 0, w=2 0 0 4',
    `pull replace: every named tensor, payload order, repeats summed: ${replaced.got} (${replaced.count} tensors)`);
  const base = [tensor('w', 'DATA_TYPE_FLOAT32', [2, 2], [10, 20, 30, 40]), tensor('z', 'DATA_TYPE_FLOAT32', [2], [7, 8])];
  const scattered = await pull(client, 'PULL_MODE_SCATTER', payload, base);
  check(scattered.count === '2' && scattered.got === 'z=7 8, w=2 20 30 4',
    `pull scatter: repeats summed (1 + 3) and the sum replaces the base (not 44, not 3), base in another order: ${scattered.got}`);
}

// --- beyond FL4Health: sparse updates, error feedback, seeded random-k, per-coordinate averages ---------

// SplitMix64's output number i when seeded with `seed` (criteria.proto, UPDATE_SELECTION_RANDOM_K), in
// BigInt arithmetic mod 2^64.
const MASK64 = (1n << 64n) - 1n;
function splitmix64Key(seed, i) {
  let z = (seed + (BigInt(i) + 1n) * 0x9E3779B97F4A7C15n) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & MASK64;
  return z ^ (z >> 31n);
}

// POSITION_ENCODING_SEEDED: the `count` positions of smallest keys, in increasing order.
function seededPositions(seed, numel, count) {
  const keyed = Array.from({ length: numel }, (_, i) => [splitmix64Key(seed, i), i]);
  keyed.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return keyed.slice(0, count).map(([, i]) => i).sort((a, b) => a - b);
}

// The sparse tensors of an update answer, any encoding: [{ name, encoding, seed, positions, values }].
function decodeUpdate(specs, data) {
  let offset = 0;
  return specs.map((spec) => {
    const shape = spec.shape.map((d) => int64(d, 'shape'));
    const numel = numelOf(shape);
    const nnz = int64(spec.nnz, 'nnz');
    const values = readValues(data, offset, spec.dtype, nnz);
    offset += nnz * DTYPES[spec.dtype].size;
    const size = int64(spec.positions_size_bytes, 'positions_size_bytes');
    const code = data.subarray(offset, offset + size);
    offset += size;
    let positions;
    if (spec.position_encoding === 'POSITION_ENCODING_SEEDED') {
      if (size !== 0) throw new Error(`${spec.name}: SEEDED with ${size} position bytes`);
      positions = seededPositions(BigInt(spec.position_seed), numel, nnz);
    } else if (spec.position_encoding === 'POSITION_ENCODING_ELIAS_FANO') positions = decodeEliasFano(code, nnz, numel);
    else if (spec.position_encoding === 'POSITION_ENCODING_BITMAP') positions = decodeBitmap(code, nnz, numel);
    else if (spec.position_encoding === 'POSITION_ENCODING_COO_INT64') {
      const strides = shape.map((_, d) => numelOf(shape.slice(d + 1)));
      positions = Array.from({ length: nnz }, (_, i) => strides.reduce(
        (flat, stride, d) => flat + Number(code.readBigInt64LE(8 * (i * shape.length + d))) * stride, 0));
    } else throw new Error(`${spec.name}: unexpected ${spec.position_encoding}`);
    return { name: spec.name, encoding: spec.position_encoding, seed: spec.position_seed, positions, values };
  });
}

const entriesOf = (t) => t.positions.map((p, i) => `${p}:${t.values[i]}`).join(' ');

// Seeded random-k: the server sends seeds instead of positions, and this client draws the same ones.
// a (20 entries) and b (7) at 0.25: ceil(5) and ceil(1.75) = 2 positions, seeds 42 and 43 (42 + index).
async function randomK(client) {
  const a = Array.from({ length: 20 }, (_, i) => i + 1);
  const b = Array.from({ length: 7 }, (_, i) => -(i + 1));
  const model = [tensor('a', 'DATA_TYPE_FLOAT32', [4, 5], a), tensor('b', 'DATA_TYPE_FLOAT32', [7], b)];
  const initial = [tensor('a', 'DATA_TYPE_FLOAT32', [4, 5], a.map(() => 0)), tensor('b', 'DATA_TYPE_FLOAT32', [7], b.map(() => 0))];
  const criterion = { sparse_update: { sparsity_level: 0.25, selection: 'UPDATE_SELECTION_RANDOM_K', seed: '42' } };
  const sections = [['SECTION_MODEL', model], ['SECTION_INITIAL_MODEL', initial]];
  const seeded = reassemble(await call(client, 'Select', selectFrames({ criterion, position_encoding: 'POSITION_ENCODING_COMPACT' }, sections)));
  check(seeded.header.kind === 'SELECTION_KIND_SPARSE_UPDATE', `random-k: kind ${seeded.header.kind}`);
  const specs = seeded.manifests.sparse;
  check(specs.map((s) => `${s.name}/${s.position_encoding}/${s.position_seed}/${s.nnz}/${s.positions_size_bytes}`).join(', ')
    === 'a/POSITION_ENCODING_SEEDED/42/5/0, b/POSITION_ENCODING_SEEDED/43/2/0',
  `random-k: seeds, counts and no position bytes: ${specs.map((s) => `${s.name} seed ${s.position_seed} nnz ${s.nnz}`).join(', ')}`);
  const tensors = decodeUpdate(specs, seeded.data);
  check(tensors[0].positions.join() === '1,4,15,16,18',
    `random-k: positions drawn here from seed 42 are the ones the Python tests pin: ${tensors[0].positions.join()}`);
  check(tensors.every((t) => t.values.every((v, i) => v === (t.name === 'a' ? a : b)[t.positions[i]])),
    'random-k: the values are the update at the positions drawn here');
  const coo = reassemble(await call(client, 'Select', selectFrames({ criterion, position_encoding: 'POSITION_ENCODING_COO_INT64' }, sections)));
  const explicit = decodeUpdate(coo.manifests.sparse, coo.data);
  check(explicit.map((t) => t.positions.join()).join(' | ') === tensors.map((t) => t.positions.join()).join(' | '),
    `random-k: the server's explicit positions equal those drawn here: ${explicit.map((t) => t.positions.join()).join(' | ')}`);
}

// Error feedback over three rounds, worked out by hand (as tests/client/test_sparse_updates_sdk.py):
// w has 4 entries, sparsity 0.5 (k = 2), w0 = 0. This client keeps the residual by the rule the proto
// states: u minus what was sent (read back in the model's dtype) at the positions sent, u elsewhere.
async function errorFeedback(client) {
  const zero = [tensor('w', 'DATA_TYPE_FLOAT32', [4], [0, 0, 0, 0])];
  const rounds = [
    { w: [1, -3, 0.5, 2], sent: '1:-3 3:2', residual: '1 0 0.5 0' },
    { w: [0.5, 0, 0, 0], sent: '0:1.5 2:0.5', residual: '0 0 0 0' },
    { w: [0.25, -0.125, -1, 0], sent: '0:0.25 2:-1', residual: '0 -0.125 0 0' },
  ];
  let residual = null;
  for (const [i, round] of rounds.entries()) {
    const sections = [['SECTION_MODEL', [tensor('w', 'DATA_TYPE_FLOAT32', [4], round.w)]], ['SECTION_INITIAL_MODEL', zero]];
    if (residual) sections.push(['SECTION_RESIDUAL', [tensor('w', 'DATA_TYPE_FLOAT32', [4], residual)]]);
    const start = { criterion: { sparse_update: { sparsity_level: 0.5 } }, position_encoding: 'POSITION_ENCODING_COMPACT' };
    const reply = reassemble(await call(client, 'Select', selectFrames(start, sections)));
    const [sent] = decodeUpdate(reply.manifests.sparse, reply.data);
    const update = round.w.map((w, p) => Math.fround(w + (residual ? residual[p] : 0)));
    residual = update.slice();
    sent.positions.forEach((p, j) => { residual[p] = Math.fround(update[p] - sent.values[j]); });
    check(entriesOf(sent) === round.sent && residual.join(' ') === round.residual,
      `error feedback round ${i + 1}: sent ${entriesOf(sent)}, residual ${residual.join(' ')}`);
  }
}

// Per-coordinate averages: A (10 examples) sends w[0] = 1 and w[2] = 4, B (30) w[2] = 8 and w[3] = -2:
// w[0] = 1, w[2] = (40 + 240) / 40 = 7, w[3] = -2, whatever the order; w[1], sent by nobody, is not listed.
async function perCoordinate(client, emit) {
  const A = { num_examples: 10, tensors: [coo('w', 'DATA_TYPE_FLOAT32', [4], [1, 4], [0, 2])] };
  const B = { num_examples: 30, tensors: [coo('w', 'DATA_TYPE_FLOAT32', [4], [-2, 8], [3, 2])] }; // unsorted
  const options = { averaging: 'AVERAGING_PER_COORDINATE' };
  const ab = await aggregate(client, 'PAYLOAD_KIND_SPARSE_COO', [A, B], options);
  const ba = await aggregate(client, 'PAYLOAD_KIND_SPARSE_COO', [B, A], options);
  const [averaged] = decodeUpdate(ab.specs, ab.data);
  check(sameAnswer(ab, ba) && entriesOf(averaged) === '0:1 2:7 3:-2',
    `per-coordinate: ${entriesOf(averaged)}, the same bytes in both orders`);
  if (emit) {
    fs.writeFileSync(`${emit}.per_coordinate.json`, JSON.stringify({
      contributions: [A, B].map((c) => ({ num_examples: c.num_examples, tensors: c.tensors.map((t) => ({
        name: t.name, shape: t.shape, values: hex(t.bytes), flat: t.flat })) })),
      answer: { specs: ab.specs, data: hex(ab.data) },
    }));
  }
  // Pull ADD: the averaged update added to the base, repeats summed first: w = [10, 20, 30, 40] plus
  // 2 at 0 and 1 + 3 at 3 gives [12, 20, 30, 44].
  const payload = [coo('w', 'DATA_TYPE_FLOAT32', [2, 2], [1, 2, 3], [3, 0, 3])];
  const base = [tensor('w', 'DATA_TYPE_FLOAT32', [2, 2], [10, 20, 30, 40])];
  const added = await pull(client, 'PULL_MODE_ADD', payload, base);
  check(added.count === '1' && added.got === 'w=12 20 30 44', `pull add: ${added.got}`);
}

async function main() {
  const args = process.argv.slice(2);
  const at = args.indexOf('--target');
  const target = at >= 0 ? args[at + 1] : process.env.PARAMSEL_TARGET || '127.0.0.1:50051';
  const emitAt = args.indexOf('--emit');
  const emit = emitAt >= 0 ? args[emitAt + 1] : null;
  const Service = loadService();
  const client = new Service(target, grpc.credentials.createInsecure());
  const { model, initial } = buildModels();
  const digest = modelDigest(initial);
  console.log(`node client: ${target}, initial model sha256 ${digest.toString('hex').slice(0, 16)}...`);
  try {
    await topKSelection(client, model, initial, digest);
    await layerSelection(client, model, initial, digest);
    await badRequest(client, model);
    await unknownDigest(client, model);
    await aggregateOrders(client, emit);
    await aggregateTies(client);
    await aggregateCompactTie(client);
    await kRounding(client);
    await suppliedScores(client);
    await pullRules(client);
    await randomK(client);
    await errorFeedback(client);
    await perCoordinate(client, emit);
  } catch (err) {
    check(false, `unexpected error: ${err.code !== undefined ? `status ${err.code}: ${err.details}` : err.stack}`);
  } finally {
    client.close();
  }
  if (failures.length) {
    console.log(`node client: ${failures.length} check(s) failed`);
    process.exitCode = 1;
  } else {
    console.log('node client: all checks passed');
  }
}

main();
