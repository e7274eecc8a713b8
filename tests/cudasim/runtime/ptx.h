// ptx.h: executes the inline-PTX statements of kernel sources under cudasim.
//
// rewrite_sources.py turns every `asm volatile("TEXT" : outs : ins : clobbers);` into
// `::cudasim::ptx::exec(__FILE__, __LINE__, "TEXT", {out("+f", x), ...}, {in("r", y), ...});`,
// so the PTX text itself (opcode, types, operand order) is parsed and executed here, and
// reports name the kernel source line. Supported:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32   (warp collective)
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16           (warp collective)
//   cp.async.{ca,cg}.shared.global [dst], [src], 16{, src_bytes}; cp.async.commit_group;
//   cp.async.wait_group N; cp.async.wait_all
// Fragment layouts follow the PTX ISA (mma m16n8k16 f16/bf16; ldmatrix m8n8 b16).
// cp.async is modelled at its worst legal timing: the global source is read at issue, the
// shared destination is filled with 0xff (NaN for f16 / bf16) at issue and receives the data
// only at the wait that retires its group, so reading a tile before its wait (or without
// the barrier after it) yields NaNs instead of the right values. The race checker sees the
// issue as a write (nobody may still read the destination) and the wait as the write that
// lands (nobody else may read it before a barrier).
#pragma once

#include "core.h"

#include <initializer_list>
#include <map>
#include <string>

namespace cudasim {
namespace ptx {

struct Operand {
  const char* constraint;
  void* ptr;        // outputs
  uint64_t value;   // inputs
  int size;
  bool output;
};

template <typename T>
inline Operand out(const char* c, T& ref) {
  return Operand{c, static_cast<void*>(&ref), 0, static_cast<int>(sizeof(T)), true};
}
template <typename T>
inline Operand in(const char* c, const T& v) {
  uint64_t bits = 0;
  if constexpr (std::is_pointer_v<T>) {
    bits = reinterpret_cast<uintptr_t>(v);
  } else {
    static_assert(sizeof(T) <= 8, "asm input of up to 8 bytes");
    std::memcpy(&bits, &v, sizeof(T));
  }
  return Operand{c, nullptr, bits, static_cast<int>(sizeof(T)), false};
}

// Shared-memory "addresses" are offsets into the registered dynamic shared memory.
inline uint32_t to_shared(const void* p) {
  const Runtime& r = rt();
  const auto* c = static_cast<const unsigned char*>(p);
  if (!r.block || c < r.smem_base || c >= r.smem_base + r.block->dyn_smem_size) {
    fail("__cvta_generic_to_shared of %p: not inside this launch's dynamic shared memory", p);
  }
  return static_cast<uint32_t>(c - r.smem_base);
}
inline unsigned char* from_shared(uint32_t addr, int bytes, const char* what) {
  const Runtime& r = rt();
  if (static_cast<size_t>(addr) + bytes > r.block->dyn_smem_size) {
    fail("%s: shared address %u + %d bytes is past the %zu bytes of dynamic shared memory", what, addr, bytes,
         r.block->dyn_smem_size);
  }
  return r.smem_base + addr;
}

inline float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

struct Parsed {
  std::string opcode;
  std::vector<std::vector<int>> operands;  // each: list of %N (a vector) or one %N / -1 - immediate
  std::vector<bool> is_address;
  std::vector<long long> immediates;
};

inline Parsed parse(const std::string& text) {
  Parsed p;
  size_t i = text.find_first_not_of(" \t\n");
  size_t j = text.find_first_of(" \t\n;", i);
  p.opcode = text.substr(i, j - i);
  size_t end = text.find(';', j);
  std::string rest = text.substr(j, end == std::string::npos ? std::string::npos : end - j);
  size_t k = 0;
  while (k < rest.size()) {
    while (k < rest.size() && (rest[k] == ' ' || rest[k] == '\t' || rest[k] == '\n' || rest[k] == ',')) ++k;
    if (k >= rest.size()) break;
    std::vector<int> regs;
    bool address = false;
    auto read_reg = [&]() {
      while (rest[k] == ' ') ++k;
      if (rest[k] == '%') {
        ++k;
        int n = 0;
        while (k < rest.size() && isdigit(static_cast<unsigned char>(rest[k]))) n = n * 10 + (rest[k++] - '0');
        regs.push_back(n);
      } else {
        long long v = std::strtoll(rest.c_str() + k, nullptr, 0);
        while (k < rest.size() && (isalnum(static_cast<unsigned char>(rest[k])) || rest[k] == '-')) ++k;
        p.immediates.push_back(v);
        regs.push_back(-static_cast<int>(p.immediates.size()));  // -1 - index
      }
      while (k < rest.size() && rest[k] == ' ') ++k;
    };
    if (rest[k] == '{') {
      ++k;
      while (rest[k] != '}') {
        read_reg();
        if (rest[k] == ',') ++k;
      }
      ++k;
    } else if (rest[k] == '[') {
      ++k;
      address = true;
      read_reg();
      if (rest[k] != ']') fail("unsupported address form in '%s'", text.c_str());
      ++k;
    } else {
      read_reg();
    }
    p.operands.push_back(regs);
    p.is_address.push_back(address);
  }
  return p;
}

struct Args {
  std::vector<Operand> ops;  // %0.. = outputs then inputs (GCC numbering)
  const Parsed* parsed;
  const char* text;
  smem_check::Site site;
  uint64_t value(int reg) const {
    if (reg < 0) return static_cast<uint64_t>(parsed->immediates[-reg - 1]);
    const Operand& o = ops.at(reg);
    if (o.output) {  // "+" operands are read too
      uint64_t v = 0;
      std::memcpy(&v, o.ptr, o.size);
      return v;
    }
    return o.value;
  }
  template <typename T>
  void store(int reg, T v) const {
    const Operand& o = ops.at(reg);
    if (!o.output || o.size != static_cast<int>(sizeof(T))) fail("'%s': %%%d is not a %zu-byte output", text, reg, sizeof(T));
    std::memcpy(o.ptr, &v, sizeof(T));
  }
};

inline bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

inline void mma_m16n8k16(const Args& a, bool bf16) {
  const auto& o = a.parsed->operands;
  if (o.size() != 4 || o[0].size() != 4 || o[1].size() != 4 || o[2].size() != 2 || o[3].size() != 4) {
    fail("'%s': mma m16n8k16 takes {4 f32}, {4 b32}, {2 b32}, {4 f32}", a.text);
  }
  struct In { uint32_t a[4], b[2]; float c[4]; };
  In mine;
  for (int i = 0; i < 4; ++i) mine.a[i] = static_cast<uint32_t>(a.value(o[1][i]));
  for (int i = 0; i < 2; ++i) mine.b[i] = static_cast<uint32_t>(a.value(o[2][i]));
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = static_cast<uint32_t>(a.value(o[3][i]));
    std::memcpy(&mine.c[i], &bits, 4);
  }
  std::memcpy(self().in, &mine, sizeof(In));
  warp_collective(kMma, 0xffffffffu, a.site.file, a.site.line, [&](Thread** lanes) {
    float A[16][16], B[16][8], C[16][8];
    auto lo = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r & 0xffff), bf16); };
    auto hi = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r >> 16), bf16); };
    for (int l = 0; l < 32; ++l) {
      In x;
      std::memcpy(&x, lanes[l]->in, sizeof(In));
      const int g = l / 4, t = l % 4;
      A[g][2 * t] = lo(x.a[0]);         A[g][2 * t + 1] = hi(x.a[0]);
      A[g + 8][2 * t] = lo(x.a[1]);     A[g + 8][2 * t + 1] = hi(x.a[1]);
      A[g][2 * t + 8] = lo(x.a[2]);     A[g][2 * t + 9] = hi(x.a[2]);
      A[g + 8][2 * t + 8] = lo(x.a[3]); A[g + 8][2 * t + 9] = hi(x.a[3]);
      B[2 * t][g] = lo(x.b[0]);         B[2 * t + 1][g] = hi(x.b[0]);
      B[2 * t + 8][g] = lo(x.b[1]);     B[2 * t + 9][g] = hi(x.b[1]);
      C[g][2 * t] = x.c[0];     C[g][2 * t + 1] = x.c[1];
      C[g + 8][2 * t] = x.c[2]; C[g + 8][2 * t + 1] = x.c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      float d[4];
      for (int e = 0; e < 4; ++e) {
        // Products of f16 / bf16 are exact in fp32; the sum is rounded once (hardware
        // accumulates in fp32 with its own order: compare with a tolerance).
        double s = C[rows[e]][cols[e]];
        for (int k = 0; k < 16; ++k) s += static_cast<double>(A[rows[e]][k] * B[k][cols[e]]);
        d[e] = static_cast<float>(s);
      }
      std::memcpy(lanes[l]->out, d, sizeof(d));
    }
  });
  float d[4];
  std::memcpy(d, self().out, sizeof(d));
  for (int i = 0; i < 4; ++i) a.store(o[0][i], d[i]);
}

inline void ldmatrix(const Args& a, int num, bool trans) {
  const auto& o = a.parsed->operands;
  if (o.size() != 2 || static_cast<int>(o[0].size()) != num || !a.parsed->is_address[1]) {
    fail("'%s': ldmatrix .x%d takes {%d b32}, [address]", a.text, num, num);
  }
  Thread& me = self();
  // Lanes 8i..8i+7 give the row addresses of matrix i; a lane reads only its own row.
  if (me.lane < 8 * num) {
    const uint32_t addr = static_cast<uint32_t>(a.value(o[1][0]));
    if (addr % 16) fail("'%s': lane %d row address %u is not 16-byte aligned", a.text, me.lane, addr);
    const unsigned char* row = from_shared(addr, 16, "ldmatrix");
    smem_check::read(row, 16, a.site);
    smem_check::raw_copy(me.in, row, 16);
  }
  warp_collective(trans ? kLdmatrixTrans : kLdmatrix, 0xffffffffu, a.site.file, a.site.line, [&](Thread** lanes) {
    for (int l = 0; l < 32; ++l) {
      uint32_t r[4] = {};
      for (int i = 0; i < num; ++i) {
        uint16_t e0, e1;
        if (!trans) {  // row l/4, columns 2(l%4), 2(l%4)+1 of matrix i
          const unsigned char* row = lanes[8 * i + l / 4]->in;
          std::memcpy(&e0, row + 2 * (2 * (l % 4)), 2);
          std::memcpy(&e1, row + 2 * (2 * (l % 4) + 1), 2);
        } else {  // column l/4, rows 2(l%4), 2(l%4)+1 of matrix i
          std::memcpy(&e0, lanes[8 * i + 2 * (l % 4)]->in + 2 * (l / 4), 2);
          std::memcpy(&e1, lanes[8 * i + 2 * (l % 4) + 1]->in + 2 * (l / 4), 2);
        }
        r[i] = static_cast<uint32_t>(e0) | static_cast<uint32_t>(e1) << 16;
      }
      std::memcpy(lanes[l]->out, r, sizeof(r));
    }
  });
  uint32_t r[4];
  std::memcpy(r, me.out, sizeof(r));
  for (int i = 0; i < num; ++i) a.store(o[0][i], r[i]);
}

inline void complete(std::vector<PendingCopy>& group, smem_check::Site site) {
  for (PendingCopy& c : group) {
    smem_check::write(c.dst, c.size, site);
    smem_check::raw_copy(c.dst, c.data, c.size);
  }
  group.clear();
}

inline void cp_async(const Args& a) {
  const auto& o = a.parsed->operands;
  if (o.size() < 3 || !a.parsed->is_address[0] || !a.parsed->is_address[1]) fail("'%s': cp.async [dst], [src], size{, src_size}", a.text);
  const int size = static_cast<int>(a.value(o[2][0]));
  const int src_bytes = o.size() > 3 ? static_cast<int>(a.value(o[3][0])) : size;
  if (size != 4 && size != 8 && size != 16) fail("'%s': cp-size %d", a.text, size);
  if (has(a.parsed->opcode, ".cg") && size != 16) fail("'%s': cp.async.cg needs cp-size 16", a.text);
  if (src_bytes < 0 || src_bytes > size) fail("'%s': src-size %d", a.text, src_bytes);
  const uint32_t dst_addr = static_cast<uint32_t>(a.value(o[0][0]));
  const auto* src = reinterpret_cast<const unsigned char*>(a.value(o[1][0]));
  if (dst_addr % size || reinterpret_cast<uintptr_t>(src) % size) fail("'%s': unaligned cp.async (dst %u, src %p)", a.text, dst_addr, static_cast<const void*>(src));
  PendingCopy c;
  c.dst = from_shared(dst_addr, size, "cp.async");
  c.size = size;
  std::memset(c.data, 0, sizeof(c.data));
  if (src_bytes > 0) std::memcpy(c.data, src, src_bytes);  // the global read (ASan-checked)
  smem_check::write(c.dst, size, a.site);
  static const unsigned char kPoison[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  smem_check::raw_copy(c.dst, kPoison, size);  // contents undefined until the wait
  self().uncommitted.push_back(c);
}

inline void exec(const char* file, int line, const char* text, std::initializer_list<Operand> outs,
                 std::initializer_list<Operand> ins) {
  // Keyed by the literal's address; node-based, so entries stay put while other fibers,
  // suspended inside exec, still point at theirs.
  static thread_local std::map<const char*, Parsed> cache;
  auto it = cache.find(text);
  if (it == cache.end()) it = cache.emplace(text, parse(text)).first;
  const Parsed* parsed = &it->second;
  Args a;
  a.ops.assign(outs.begin(), outs.end());
  a.ops.insert(a.ops.end(), ins.begin(), ins.end());
  a.parsed = parsed;
  a.text = text;
  a.site.file = file;
  a.site.line = line;
  const std::string& op = parsed->opcode;
  Thread& me = self();
  if (op.rfind("mma.sync.aligned.m16n8k16.row.col.f32.", 0) == 0 && has(op, ".f32.f16.f16.f32")) {
    mma_m16n8k16(a, false);
  } else if (op.rfind("mma.sync.aligned.m16n8k16.row.col.f32.", 0) == 0 && has(op, ".f32.bf16.bf16.f32")) {
    mma_m16n8k16(a, true);
  } else if (op.rfind("ldmatrix.sync.aligned.", 0) == 0 && has(op, ".m8n8") && has(op, ".shared") && has(op, ".b16")) {
    const int num = has(op, ".x4") ? 4 : has(op, ".x2") ? 2 : 1;
    ldmatrix(a, num, has(op, ".trans"));
  } else if (op == "cp.async.ca.shared.global" || op == "cp.async.cg.shared.global") {
    cp_async(a);
  } else if (op == "cp.async.commit_group") {
    me.groups.push_back(std::move(me.uncommitted));
    me.uncommitted.clear();
  } else if (op == "cp.async.wait_group") {
    const size_t pending = static_cast<size_t>(a.value(parsed->operands.at(0).at(0)));
    while (me.groups.size() > pending) {
      complete(me.groups.front(), a.site);
      me.groups.erase(me.groups.begin());
    }
  } else if (op == "cp.async.wait_all") {
    me.groups.push_back(std::move(me.uncommitted));
    me.uncommitted.clear();
    for (auto& g : me.groups) complete(g, a.site);
    me.groups.clear();
  } else {
    fail("unsupported inline PTX: '%s'", text);
  }
}

}  // namespace ptx
}  // namespace cudasim

inline size_t __cvta_generic_to_shared(const void* p) { return ::cudasim::ptx::to_shared(p); }
