// The executor's own steps (executor.h): each a node of the vocabulary, or a
// conversion the planner adds. Float math follows torch's CPU kernels where
// that decides the rounding (one rounding per operation, no FMA; pooling sums
// in window order), so the torch build gets the trained model's logits.
#pragma once
#include <memory>

#include "executor.h"

namespace ctmq {
namespace rt {

// The step of a node of the vocabulary (native kernels only).
std::unique_ptr<Step> make_step(const Node& node);

// NCHW <-> NHWC (from -> to) of one value, added by the planner.
std::unique_ptr<Step> make_convert(const std::string& name, Layout from, Layout to);
// The packed sign bits of a float NHWC value: bit = (x + threshold) >= 0.
std::unique_ptr<Step> make_pack(const std::string& name, const float* threshold);

// Runs fn(i) for i in [0, n), split over the context's threads when the
// work (n times `cost` elements) is worth it.
void for_range(const Context& ctx, int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn);

// The binary conv step and the hooks the planner calls on it (binary_step.cpp).
std::unique_ptr<Step> make_binary_conv(const Node& node);
// The input bias (RSign) the binary conv step adds before taking signs, or null.
const float* binary_conv_input_bias(const Step& step);
bool is_binary_conv(const Step& step);

}  // namespace rt
}  // namespace ctmq
