// Reading a ctmq artifact without Python: the safetensors container, the JSON
// header, the checksum, and every check that ctmq.artifact applies (format,
// version, graph, input description, each node's attributes and tensors,
// the shapes from the declared input to the logits, bounded before anything
// is allocated), refusing the same files with the same messages. Torch-free.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "executor.h"
#include "json.h"

namespace ctmq {
namespace rt {

struct ArtifactError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kFormatVersion = 3;  // the newest artifact version this reader knows

struct Artifact {
  json::Value header;
  Tensors tensors;  // views of `storage`, each 64-byte aligned
  std::shared_ptr<std::vector<uint8_t>> storage;
  int64_t channels = 0, size = 0;
  std::vector<float> mean, std;
  std::vector<std::string> class_names;
};

// The artifact in a file or in memory (`name` prefixes the messages, as the
// path does). Throws ArtifactError.
Artifact read_artifact_file(const std::string& path);
Artifact read_artifact_bytes(const uint8_t* data, size_t size, const std::string& name);

// The checks that follow decoding (ctmq.artifact.check_artifact), on a header
// and tensors; throws ArtifactError without a file name.
void check_artifact(const json::Value& header, const Tensors& tensors);

}  // namespace rt
}  // namespace ctmq
