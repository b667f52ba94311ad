// SHA-256 (FIPS 180-4), for the artifact's checksum. Torch-free.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace ctmq {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  void update(const std::string& s) { update(s.data(), s.size()); }
  std::string hex();  // the digest as 64 lowercase hex digits; ends the hash

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace ctmq
