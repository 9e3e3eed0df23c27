// A CUDA injection library (CUDA_INJECTION64_PATH) that records every kernel's, copy's and fill's GPU start and end and every CUDA runtime
// and driver API call of the process with CUPTI's activity API, for scripts/gpu/timeline-step.sh on machines without
// Nsight Systems. Writes two CSV files at exit, named by LORAHUB_TRACE_PREFIX (default /tmp/lorahub-trace):
// <prefix>_gpu.csv (kernels, and copies/fills named "[memcpy HtoD 8 B pageable]", "[memset 4 B]") and <prefix>_api.csv (API calls), in the column names timeline_gaps.py reads. Timestamps are
// CUPTI's (ns, one clock for GPU and host records). KREC is the kernel record type of the CUPTI headers at hand
// (CUpti_ActivityKernel9, 10, ...; the script tries the newest first); MREC, SREC likewise for copies and fills.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif
#ifndef MREC
#define MREC CUpti_ActivityMemcpy5
#endif
#ifndef SREC
#define SREC CUpti_ActivityMemset4
#endif

static FILE *gpu_out, *api_out;
static const size_t buffer_bytes = 16u << 20;

// A kernel name in CSV: quoted, inner quotes doubled (template names hold commas).
static void write_quoted(FILE *f, const char *s) {
  fputc('"', f);
  for (; s && *s; s++) {
    if (*s == '"') fputc('"', f);
    fputc(*s, f);
  }
  fputc('"', f);
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = (uint8_t *)aligned_alloc(8, buffer_bytes);
  *size = buffer_bytes;
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
  CUpti_Activity *record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      const KREC *k = (const KREC *)record;
      fprintf(gpu_out, "%llu,%llu,%u,%u,", (unsigned long long)k->start, (unsigned long long)(k->end - k->start),
              k->correlationId, k->streamId);
      write_quoted(gpu_out, k->name);
      fputc('\n', gpu_out);
#ifndef NO_COPIES
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      // Copies and fills take the stream too; named with their kind and size so that the gaps they fill show.
      const MREC *m = (const MREC *)record;
      static const char *kinds[] = {"?", "HtoD", "DtoH", "HtoA", "AtoH", "AtoA", "AtoD", "DtoA", "DtoD", "HtoH", "PtoP"};
      fprintf(gpu_out, "%llu,%llu,%u,%u,\"[memcpy %s %llu B%s]\"\n", (unsigned long long)m->start,
              (unsigned long long)(m->end - m->start), m->correlationId, m->streamId, m->copyKind < 11 ? kinds[m->copyKind] : "?",
              (unsigned long long)m->bytes, m->srcKind == CUPTI_ACTIVITY_MEMORY_KIND_PAGEABLE ? " pageable" : "");
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const SREC *m = (const SREC *)record;
      fprintf(gpu_out, "%llu,%llu,%u,%u,\"[memset %llu B]\"\n", (unsigned long long)m->start,
              (unsigned long long)(m->end - m->start), m->correlationId, m->streamId, (unsigned long long)m->bytes);
#endif
    } else if (record->kind == CUPTI_ACTIVITY_KIND_RUNTIME || record->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)record;
      const char *name = NULL;
      cuptiGetCallbackName(record->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? CUPTI_CB_DOMAIN_RUNTIME_API : CUPTI_CB_DOMAIN_DRIVER_API,
                           a->cbid, &name);
      fprintf(api_out, "%llu,%llu,%s,%u,%u\n", (unsigned long long)a->start, (unsigned long long)(a->end - a->start),
              name ? name : "?", a->correlationId, a->threadId);
    }
  }
  free(buffer);
}

static void finish(void) {
  cuptiActivityFlushAll(1);
  if (gpu_out) fclose(gpu_out);
  if (api_out) fclose(api_out);
}

int InitializeInjection(void) {
  const char *prefix = getenv("LORAHUB_TRACE_PREFIX");
  char path[4096];
  if (!prefix) prefix = "/tmp/lorahub-trace";
  snprintf(path, sizeof path, "%s_gpu.csv", prefix);
  gpu_out = fopen(path, "w");
  snprintf(path, sizeof path, "%s_api.csv", prefix);
  api_out = fopen(path, "w");
  if (!gpu_out || !api_out) return 0;
  fputs("Start (ns),Duration (ns),CorrId,Strm,Name\n", gpu_out);
  fputs("Start (ns),Duration (ns),Name,CorrID,Tid\n", api_out);
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
#ifndef NO_COPIES
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
#endif
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
  atexit(finish);
  return 1;
}
