// elementwise.cu: the memory-bound ops of the engine: fills, sums, scaled sums, clamps, ReLU, the
// per-channel affine map, the classifiers' option-A shortcut and pooling, nearest x2 upsampling (which
// the UNet folds into its convolutions; here for its backward and for tests), and dtype conversion.
//
// Layout: 4-D tensors NHWC (the channel of element i is i % C), other tensors row-major.
// Precision: every operand's storage type is a run-time code (DTYPE_F32/F16/BF16, common.cuh), so
// one kernel serves every mix of f32 activations, f16/bf16 activations and f32 gradients; arithmetic
// in f32, one rounding on store. Backward ops write their input gradient (dx = ...) or accumulate into
// it (dx += ...), as the Backend trait's GradientStore says (the kernels' `accumulate`).
// Versions: one each; all are grid-stride loops, bandwidth-bound, and the branch on the storage
// type is uniform over the grid.
#include "common.cuh"

extern "C" __global__ void fill(void* out, int dt, long long n, float value) {
    GRID_STRIDE_LOOP(i, n) store_dyn(out, dt, i, value);
}

// dst = src with a change of storage type.
extern "C" __global__ void convert(const void* src, int dt_src, void* dst, int dt_dst, long long n) {
    GRID_STRIDE_LOOP(i, n) store_dyn(dst, dt_dst, i, load_dyn(src, dt_src, i));
}

extern "C" __global__ void add_assign(void* dst, int dt_dst, const void* src, int dt_src, long long n) {
    GRID_STRIDE_LOOP(i, n) store_dyn(dst, dt_dst, i, load_dyn(dst, dt_dst, i) + load_dyn(src, dt_src, i));
}

// out = a x + b y
extern "C" __global__ void axpby(float a, const void* x, int dt_x, float b, const void* y, int dt_y, void* out,
                                 int dt_out, long long n) {
    GRID_STRIDE_LOOP(i, n) store_dyn(out, dt_out, i, a * load_dyn(x, dt_x, i) + b * load_dyn(y, dt_y, i));
}

extern "C" __global__ void clamp_inplace(void* x, int dt, long long n, float lo, float hi) {
    GRID_STRIDE_LOOP(i, n) store_dyn(x, dt, i, fminf(fmaxf(load_dyn(x, dt, i), lo), hi));
}

// grad = 0 where x lies outside [lo, hi].
extern "C" __global__ void clamp_backward(const void* x, int dt_x, float lo, float hi, void* grad, int dt_grad,
                                          long long n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = load_dyn(x, dt_x, i);
        if (!(v >= lo && v <= hi)) store_dyn(grad, dt_grad, i, 0.0f);
    }
}

extern "C" __global__ void relu_inplace(void* x, int dt, long long n) {
    GRID_STRIDE_LOOP(i, n) store_dyn(x, dt, i, fmaxf(load_dyn(x, dt, i), 0.0f));
}

// dx = (or += where `accumulate`) dy where y > 0; elsewhere 0 (accumulating: dx left alone).
extern "C" __global__ void relu_backward(const void* y, int dt_y, const void* dy, int dt_dy, void* dx, int dt_dx,
                                         long long n, int accumulate) {
    GRID_STRIDE_LOOP(i, n) {
        const bool open = load_dyn(y, dt_y, i) > 0.0f;
        if (open || !accumulate) store_grad(dx, dt_dx, i, open ? load_dyn(dy, dt_dy, i) : 0.0f, accumulate);
    }
}

// out = x * scale[c] + shift[c], c = i % channels (scale, shift f32).
extern "C" __global__ void channel_affine(const void* x, int dt_x, const float* scale, const float* shift,
                                          void* out, int dt_out, long long n, int channels) {
    GRID_STRIDE_LOOP(i, n) {
        const int c = (int)(i % channels);
        store_dyn(out, dt_out, i, load_dyn(x, dt_x, i) * scale[c] + shift[c]);
    }
}

// dx = (or += where `accumulate`) dout * scale[c].
extern "C" __global__ void channel_affine_backward(const void* dout, int dt_dout, const float* scale, void* dx,
                                                   int dt_dx, long long n, int channels, int accumulate) {
    GRID_STRIDE_LOOP(i, n) {
        const int c = (int)(i % channels);
        store_grad(dx, dt_dx, i, load_dyn(dout, dt_dout, i) * scale[c], accumulate);
    }
}

// CIFAR ResNet option-A shortcut: out[n, oy, ox, co] = x[n, 2oy, 2ox, co - pad] for pad <= co <
// pad + C, else 0. x: N x H x W x C, out: N x ceil(H/2) x ceil(W/2) x (C + 2 pad).
extern "C" __global__ void shortcut_subsample_pad(const void* x, int dt_x, void* out, int dt_out, int batch,
                                                  int height, int width, int channels, int pad) {
    const int oh = (height + 1) / 2, ow = (width + 1) / 2, oc = channels + 2 * pad;
    const long long n_out = (long long)batch * oh * ow * oc;
    GRID_STRIDE_LOOP(i, n_out) {
        const int co = (int)(i % oc);
        long long pixel = i / oc;
        const int ox = (int)(pixel % ow);
        pixel /= ow;
        const int oy = (int)(pixel % oh);
        const int n = (int)(pixel / oh);
        const int ci = co - pad;
        float v = 0.0f;
        if (ci >= 0 && ci < channels)
            v = load_dyn(x, dt_x, (((long long)n * height + 2 * oy) * width + 2 * ox) * channels + ci);
        store_dyn(out, dt_out, i, v);
    }
}

// dx[n, y, x, ci] = (or += where `accumulate`) dout[n, y/2, x/2, ci + pad] at even (y, x), 0 at the
// other positions. Writing visits every dx element; accumulating only the even positions (a quarter).
extern "C" __global__ void shortcut_subsample_pad_backward(const void* dout, int dt_dout, void* dx, int dt_dx,
                                                           int batch, int height, int width, int channels,
                                                           int pad, int accumulate) {
    const int oh = (height + 1) / 2, ow = (width + 1) / 2, oc = channels + 2 * pad;
    const int step = accumulate ? 2 : 1;
    const int rows = accumulate ? oh : height, cols = accumulate ? ow : width;
    GRID_STRIDE_LOOP(i, (long long)batch * rows * cols * channels) {
        const int ci = (int)(i % channels);
        long long pixel = i / channels;
        const int x = (int)(pixel % cols) * step;
        pixel /= cols;
        const int y = (int)(pixel % rows) * step;
        const int n = (int)(pixel / rows);
        float g = 0.0f;
        if (y % 2 == 0 && x % 2 == 0)
            g = load_dyn(dout, dt_dout, (((long long)n * oh + y / 2) * ow + x / 2) * oc + ci + pad);
        store_grad(dx, dt_dx, (((long long)n * height + y) * width + x) * channels + ci, g, accumulate);
    }
}

// out[n, c] = mean over the plane of x[n, :, :, c]; one thread per (n, c): neighbouring threads
// read neighbouring channels, so the loads coalesce.
extern "C" __global__ void global_avg_pool(const void* x, int dt_x, void* out, int dt_out, int batch, int plane,
                                           int channels) {
    GRID_STRIDE_LOOP(i, (long long)batch * channels) {
        const long long n = i / channels, c = i % channels;
        const long long base = n * plane * channels + c;
        float sum = 0.0f;
        for (int p = 0; p < plane; ++p) sum += load_dyn(x, dt_x, base + (long long)p * channels);
        store_dyn(out, dt_out, i, sum / (float)plane);
    }
}

// dx[n, p, c] = (or += where `accumulate`) dout[n, c] / plane.
extern "C" __global__ void global_avg_pool_backward(const void* dout, int dt_dout, void* dx, int dt_dx, int batch,
                                                    int plane, int channels, int accumulate) {
    GRID_STRIDE_LOOP(i, (long long)batch * plane * channels) {
        const long long c = i % channels, n = i / ((long long)plane * channels);
        store_grad(dx, dt_dx, i, load_dyn(dout, dt_dout, n * channels + c) / (float)plane, accumulate);
    }
}

// out (N x 2H x 2W x C) = nearest x2 upsampling of x (N x H x W x C).
extern "C" __global__ void upsample_nearest2x(const void* x, int dt_x, void* out, int dt_out, int batch, int height,
                                              int width, int channels) {
    const long long n_out = (long long)batch * 4 * height * width * channels;
    GRID_STRIDE_LOOP(i, n_out) {
        const int c = (int)(i % channels);
        long long pixel = i / channels;
        const int ox = (int)(pixel % (2 * width));
        pixel /= 2 * width;
        const int oy = (int)(pixel % (2 * height));
        const int n = (int)(pixel / (2 * height));
        store_dyn(out, dt_out, i, load_dyn(x, dt_x, (((long long)n * height + oy / 2) * width + ox / 2) * channels + c));
    }
}

// dx = (or += where `accumulate`) the sum of the four upsampled copies of each element.
extern "C" __global__ void upsample_nearest2x_backward(const void* dout, int dt_dout, void* dx, int dt_dx, int batch,
                                                       int height, int width, int channels, int accumulate) {
    const long long n_in = (long long)batch * height * width * channels;
    GRID_STRIDE_LOOP(i, n_in) {
        const int c = (int)(i % channels);
        long long pixel = i / channels;
        const int x = (int)(pixel % width);
        pixel /= width;
        const int y = (int)(pixel % height);
        const int n = (int)(pixel / height);
        float g = 0.0f;
        for (int dy = 0; dy < 2; ++dy)
            for (int dx_ = 0; dx_ < 2; ++dx_)
                g += load_dyn(dout, dt_dout,
                              (((long long)n * 2 * height + 2 * y + dy) * 2 * width + 2 * x + dx_) * channels + c);
        store_grad(dx, dt_dx, i, g, accumulate);
    }
}
