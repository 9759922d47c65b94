#!/usr/bin/env node
// A paramsel client in plain JavaScript (Node >= 18): proof that the contract in proto/paramsel/v1 is
// usable from a language other than Python, with nothing but the .proto files and docs/clients.md.
//
//   node client.js --target 127.0.0.1:50051
//
// It builds a small model and an initial model, streams both to Select (top-k, COMPACT positions),
// decodes the sparse reply (Elias-Fano and bitmap positions), then a layer selection that names the
// initial model by digest only, and one bad request; every answer is checked against what this script
// computes itself. Exit status 0 only when every check passed.
'use strict';

const crypto = require('node:crypto');
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
  DATA_TYPE_FLOAT32: { number: 1, size: 4, read: (v, o) => v.getFloat32(o, true) },
  DATA_TYPE_FLOAT64: { number: 2, size: 8, read: (v, o) => v.getFloat64(o, true) },
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
  const bytes = Buffer.alloc(values.length * DTYPES[dtype].size);
  values.forEach((x, i) => {
    if (dtype === 'DATA_TYPE_FLOAT32') bytes.writeFloatLE(x, 4 * i);
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

async function main() {
  const args = process.argv.slice(2);
  const at = args.indexOf('--target');
  const target = at >= 0 ? args[at + 1] : process.env.PARAMSEL_TARGET || '127.0.0.1:50051';
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
