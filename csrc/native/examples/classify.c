/* Classify one image with the native runtime's C API.
 *
 *   cc classify.c -o classify $(pkg-config --cflags --libs ctmq_runtime)
 *   ./classify model.ctmq image.ppm      (binary PPM, P6, at the model's size)
 *   ./classify model.ctmq                (a mid-gray image)
 */
#include <ctmq_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char* read_ppm(const char* path, int size, int channels) {
  FILE* f = fopen(path, "rb");
  int w = 0, h = 0, maxval = 0;
  unsigned char* pixels = NULL;
  if (f && fscanf(f, "P6 %d %d %d", &w, &h, &maxval) == 3 && fgetc(f) != EOF && w == size && h == size &&
      maxval == 255 && channels == 3) {
    pixels = malloc((size_t)size * size * 3);
    if (pixels && fread(pixels, 1, (size_t)size * size * 3, f) != (size_t)size * size * 3) {
      free(pixels);
      pixels = NULL;
    }
  }
  if (f) fclose(f);
  return pixels;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL.ctmq [IMAGE.ppm]\n", argv[0]);
    return 2;
  }
  char err[512];
  ctmq_options options = {2, "auto"}; /* 2 threads, the best kernels the CPU has */
  ctmq_model* model = ctmq_open(argv[1], &options, err, sizeof err);
  if (!model) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  const int size = ctmq_input_size(model), channels = ctmq_input_channels(model);
  const int classes = ctmq_num_classes(model);
  unsigned char* pixels;
  if (argc > 2) {
    pixels = read_ppm(argv[2], size, channels);
    if (!pixels) {
      fprintf(stderr, "%s: expected a binary PPM of %dx%d RGB pixels\n", argv[2], size, size);
      ctmq_close(model);
      return 1;
    }
  } else {
    pixels = malloc((size_t)size * size * channels);
    memset(pixels, 128, (size_t)size * size * channels);
  }
  float* logits = malloc(sizeof(float) * classes);
  if (ctmq_run_pixels(model, pixels, 1, logits, err, sizeof err) != 0) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  int top[5];
  float prob[5];
  const int k = classes < 5 ? classes : 5;
  ctmq_topk(logits, classes, k, top, prob);
  for (int i = 0; i < k; ++i) printf("%s %.1f%%\n", ctmq_class_name(model, top[i]), 100 * prob[i]);
  free(logits);
  free(pixels);
  ctmq_close(model);
  return 0;
}
