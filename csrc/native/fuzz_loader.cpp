// The loader under hostile input: every byte string must be refused with an
// error (or load), never crash, hang or read out of bounds. With libFuzzer
// (clang, -DCTMQ_FUZZ=ON) it is a fuzz target; elsewhere a bounded loop of
// random mutations of the seed artifacts given on the command line:
//   ctmq-fuzz-loader SEED.ctmq... [--runs N] [--seed S] [--headers]
// --headers mutates the JSON header text of a seed past its checksum (which
// a random edit of the file would fail first) and gives it to the checks
// and the executor: what the attribute, shape and size checks must stop.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../runtime/artifact.h"
#include "../runtime/executor.h"
#include "ctmq_runtime.h"

namespace {

int load(const uint8_t* data, size_t size) {
  char err[512];
  ctmq_options options{1, "scalar"};
  ctmq_model* m = ctmq_open_memory(data, size, &options, err, sizeof(err));
  if (m) {
    const int c = ctmq_input_channels(m), s = ctmq_input_size(m), k = ctmq_num_classes(m);
    if (static_cast<int64_t>(c) * s * s <= (1 << 20)) {  // run small models once
      std::vector<float> x(static_cast<size_t>(c) * s * s, 0.5f), y(k);
      ctmq_run(m, x.data(), 1, y.data(), err, sizeof(err));
    }
    ctmq_close(m);
  }
  return 0;
}

// One mutated header through the checks, and where they pass the executor.
bool check_header(const ctmq::rt::Artifact& seed, const std::string& text) {
  using namespace ctmq;
  json::Value header;
  try {
    header = json::parse(text);
    rt::check_artifact(header, seed.tensors);
  } catch (const std::exception&) {
    return false;  // refused: what should happen
  }
  try {
    rt::Context ctx;
    rt::Executor exec(header, seed.tensors, ctx);
    const int64_t c = exec.channels(), s = exec.size();
    if (c * s * s > (1 << 20)) return true;
    std::vector<float> x(static_cast<size_t>(c * s * s), 0.25f), y(exec.classes());
    exec.run(x.data(), 1, y.data());
  } catch (const std::exception&) {
  }
  return true;
}

int fuzz_headers(const std::vector<std::vector<uint8_t>>& seeds, long runs, std::mt19937& rng) {
  std::vector<ctmq::rt::Artifact> arts;
  for (const auto& s : seeds) arts.push_back(ctmq::rt::read_artifact_bytes(s.data(), s.size(), "seed"));
  long passed = 0;
  for (long r = 0; r < runs; ++r) {
    const ctmq::rt::Artifact& a = arts[rng() % arts.size()];
    std::string text = a.header.dump();
    const int edits = 1 + rng() % 4;
    for (int e = 0; e < edits && !text.empty(); ++e) {
      const size_t at = rng() % text.size();
      switch (rng() % 4) {
        case 0:
          text[at] = "0123456789"[rng() % 10];
          break;  // a digit: sizes, strides
        case 1:
          text.insert(at, std::to_string(rng() % 100000));
          break;
        case 2:
          text[at] = "{}[]\":,-.e"[rng() % 11];
          break;  // structure
        default:
          text.erase(at, 1 + rng() % 8);
          break;
      }
    }
    passed += check_header(a, text);
  }
  std::printf("ctmq-fuzz-loader: %ld headers, %ld passed the checks, no crash\n", runs, passed);
  return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return load(data, size);
}

#ifndef CTMQ_LIBFUZZER
int main(int argc, char** argv) {
  long runs = 2000;
  unsigned seed = 1;
  bool headers = false;
  std::vector<std::vector<uint8_t>> seeds;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
      runs = std::atol(argv[++i]);
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc)
      seed = static_cast<unsigned>(std::atol(argv[++i]));
    else if (!std::strcmp(argv[i], "--headers"))
      headers = true;
    else {
      std::ifstream f(argv[i], std::ios::binary);
      seeds.emplace_back((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    }
  }
  if (seeds.empty()) {
    std::fprintf(stderr, "usage: ctmq-fuzz-loader SEED.ctmq... [--runs N] [--seed S]\n");
    return 2;
  }
  std::mt19937 rng(seed);
  if (headers) return fuzz_headers(seeds, runs, rng);
  long loaded = 0;
  for (long r = 0; r < runs; ++r) {
    std::vector<uint8_t> b = seeds[rng() % seeds.size()];
    const int edits = 1 + rng() % 8;
    for (int e = 0; e < edits && !b.empty(); ++e) {
      const size_t at = rng() % b.size();
      switch (rng() % 5) {
        case 0:
          b[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;  // flip a bit
        case 1:
          b[at] = static_cast<uint8_t>(rng());
          break;  // a random byte
        case 2:
          b.resize(at);
          break;  // truncate
        case 3:
          b.insert(b.begin() + at, static_cast<uint8_t>(rng()));
          break;  // insert
        default:
          b[at] = "{}[]\":,0123456789-e.tfn"[rng() % 23];
          break;  // JSON bytes
      }
    }
    char err[512];
    ctmq_options options{1, "scalar"};
    ctmq_model* m = ctmq_open_memory(b.data(), b.size(), &options, err, sizeof(err));
    if (m) {
      ++loaded;
      ctmq_close(m);
    }
    if (r < 3) load(b.data(), b.size());
  }
  std::printf("ctmq-fuzz-loader: %ld inputs, %ld loaded, no crash\n", runs, loaded);
  return 0;
}
#endif
