// A TouchDesigner-style host: one execute() per cooked frame that submits this frame, takes
// whatever result is ready, and never waits on inference (a TOP's cook must not stall).
//
//   td_style_host MODEL_DIR VAE_DIR FRAMES_DIR
//
// Cooks at ~60 fps over FRAMES_DIR/NNN.ppm (looped) until it has shown 6 outputs, changes the
// prompt from the "parameter page" half way, and prints the longest execute() it saw. Exit
// status 0 when outputs arrived in submission order.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "sdstream.h"
#include "../c/ppm.h"

namespace {

struct EngineDeleter {
    void operator()(SdsEngine *engine) const { sds_engine_destroy(engine); }
};
using EnginePtr = std::unique_ptr<SdsEngine, EngineDeleter>;

std::string params_json(const std::string &model, const std::string &prompt) {
    return "{\"model_id\": \"" + model + "\", \"prompt\": \"" + prompt +
           "\", \"width\": 64, \"height\": 64}";
}

// The operator: owns the engine and the texture shown downstream.
class StreamDiffusionTop {
  public:
    StreamDiffusionTop(EnginePtr engine, size_t output_size)
        : engine_(std::move(engine)), texture_(output_size) {}

    // Called once per cook with the input TOP's pixels (valid only during the call).
    void execute(const uint8_t *rgba, uint32_t width, uint32_t height) {
        SdsFrame frame{rgba, width, height, 0, SDS_PIXEL_FORMAT_RGBA8};
        SdsStatus st = sds_engine_submit(engine_.get(), &frame, nullptr);
        if (st != SDS_OK && st != SDS_ERR_QUEUE_FULL)
            std::fprintf(stderr, "submit: %s\n", sds_engine_last_error(engine_.get()));
        // Show the newest ready output; keep the previous texture when none is ready.
        for (;;) {
            SdsOutput out{};
            out.data = texture_.data();
            out.capacity = texture_.size();
            st = sds_engine_poll(engine_.get(), &out);
            if (st == SDS_ERR_NO_OUTPUT) break;
            if (st != SDS_OK) {
                std::fprintf(stderr, "poll: %s\n", sds_engine_last_error(engine_.get()));
                break;
            }
            if (shown_ > 0 && out.frame_id <= last_id_) in_order_ = false;
            last_id_ = out.frame_id;
            shown_++;
        }
    }

    // A parameter-page change: returns at once, the worker applies it between two frames.
    void set_prompt(const std::string &params) {
        SdsUpdateKind kind;
        if (sds_engine_update_params(engine_.get(), params.c_str(), &kind) != SDS_OK)
            std::fprintf(stderr, "update: %s\n", sds_engine_last_error(engine_.get()));
    }

    int shown() const { return shown_; }
    bool in_order() const { return in_order_; }
    SdsEngine *engine() const { return engine_.get(); }

  private:
    EnginePtr engine_;
    std::vector<uint8_t> texture_;
    int shown_ = 0;
    uint64_t last_id_ = 0;
    bool in_order_ = true;
};

// RGB8 rows to RGBA8 (alpha 255), as a TOP would hand them over.
std::vector<uint8_t> to_rgba(const uint8_t *rgb, size_t pixels) {
    std::vector<uint8_t> rgba(pixels * 4);
    for (size_t i = 0; i < pixels; i++) {
        std::memcpy(&rgba[i * 4], &rgb[i * 3], 3);
        rgba[i * 4 + 3] = 255;
    }
    return rgba;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: td_style_host MODEL_DIR VAE_DIR FRAMES_DIR\n");
        return 2;
    }
    const std::string model = argv[1], vae = argv[2], frames_dir = argv[3];

    std::vector<std::vector<uint8_t>> frames;
    uint32_t width = 0, height = 0;
    for (int i = 0;; i++) {
        char path[4096];
        std::snprintf(path, sizeof path, "%s/%03d.ppm", frames_dir.c_str(), i);
        uint8_t *rgb = ppm_read(path, &width, &height);
        if (!rgb) break;
        frames.push_back(to_rgba(rgb, size_t(width) * height));
        std::free(rgb);
    }
    if (frames.empty()) {
        std::fprintf(stderr, "no frames in %s\n", frames_dir.c_str());
        return 1;
    }

    const std::string settings = "{\"vae\": \"" + vae + "\", \"allow_any_resolution\": true}";
    SdsEngine *raw = nullptr;
    // Default options: drop policy "latest" (freshest frames), warm-up on.
    SdsStatus st = sds_engine_create(params_json(model, "a watercolor of a lighthouse").c_str(),
                                     settings.c_str(), nullptr, &raw);
    if (st != SDS_OK) {
        std::fprintf(stderr, "create: %s\n", sds_last_error());
        return 1;
    }
    uint32_t out_w = 0, out_h = 0;
    size_t out_size = 0;
    if (sds_engine_output_size(raw, SDS_PIXEL_FORMAT_RGBA8, &out_w, &out_h, &out_size) != SDS_OK) {
        std::fprintf(stderr, "output_size: %s\n", sds_last_error());
        sds_engine_destroy(raw);
        return 1;
    }
    StreamDiffusionTop top(EnginePtr(raw), out_size);

    using clock = std::chrono::steady_clock;
    const auto cook_interval = std::chrono::microseconds(16667);
    double longest_ms = 0;
    int cooks = 0;
    bool prompt_changed = false;
    const int wanted = 6, max_cooks = 60 * 120;
    for (; cooks < max_cooks && top.shown() < wanted; cooks++) {
        const auto start = clock::now();
        if (!prompt_changed && top.shown() >= wanted / 2) {
            top.set_prompt(params_json(model, "an oil painting of a stormy sea"));
            prompt_changed = true;
        }
        top.execute(frames[cooks % frames.size()].data(), width, height);
        const auto spent = clock::now() - start;
        longest_ms = std::max(longest_ms,
                              std::chrono::duration<double, std::milli>(spent).count());
        std::this_thread::sleep_for(cook_interval - spent);
    }

    char *status = nullptr;
    if (sds_engine_status_json(top.engine(), &status) == SDS_OK) {
        std::printf("status: %s\n", status);
        sds_string_free(status);
    }
    std::printf("cooks %d, outputs shown %d, longest execute() %.2f ms, in order: %s\n", cooks,
                top.shown(), longest_ms, top.in_order() ? "yes" : "no");
    return top.shown() >= wanted && top.in_order() ? 0 : 1;
}
