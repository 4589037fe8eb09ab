/* Microbenchmark of the batch-1 AVX2 LUT-GEMV inner loop on its own (no tables to build, no outliers, no Python),
 * to see what bounds it on a CPU without AVX-512. A 3-bit layer of 11008 x 4096 in the row-packed layout of
 * the kernels (16-row groups, 8 rows per 256-bit vector, rows 8..15 of a group start at byte 3 of the column),
 * four groups (eight accumulators) per pass, a table of 8 floats per column. Variants, per 8 weights:
 *   full      broadcast 32-bit load, vpsrlvd, vpermps, add       (the shipped loop)
 *   nolookup  broadcast load, vpsrlvd, add                      (no look-up)
 *   noshift   broadcast load, vpermps, add                      (no decode: wrong values, the look-up's cost)
 *   loadonly  broadcast load, add                               (the floor)
 *   qwin      one 64-bit broadcast per group, both halves decoded from it (fewer loads, one more shuffle)
 * Build and run (AVX2): gcc -O3 -fopenmp experiments/lut_loop_avx2.c -o /tmp/lut2 && /tmp/lut2
 * Prints the best of 40 runs per variant, at 1 and 2 threads, in ns per 16 weights per thread and GB/s of codes.
 * (A "sliced" layout, one 32-bit lane per row holding ten 3-bit codes, plain loads and vpsrld by 3 per column,
 * measured the same as `full` on Zen 3: 1.02-1.07 ns against 1.07-1.19; it is not committed.) */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define COLS 4096
#define GROUPS 688
#define W 3
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
enum {FULL, NOLOOKUP, NOSHIFT, LOADONLY, QWIN, VARIANTS};
static const char *NAMES[]={"full","nolookup","noshift","loadonly","qwin"};
static uint16_t *codes; static float *tables; static float out[GROUPS*16];
__attribute__((target("avx2,fma"),always_inline)) static inline void runv(const int v, int g0, int g1) {
  const int words = COLS*W;
  const __m256i sh = _mm256_setr_epi32(0,W,2*W,3*W,4*W,5*W,6*W,7*W);
  const __m256i sh2 = _mm256_setr_epi32(0,W,2*W,3*W,4*W,5*W,6*W,7*W);
  for (int g=g0; g+4<=g1; g+=4) {
    __m256 acc[8]; for(int k=0;k<8;++k) acc[k]=_mm256_setzero_ps();
    const uint8_t *p=(const uint8_t*)(codes+(int64_t)g*words);
    const float *t=tables;
    for (int i=0;i<COLS;++i, p+=2*W, t+=16) {
      const __m256 tab=_mm256_loadu_ps(t);
#pragma GCC unroll 8
      for(int k=0;k<8;++k){
        const uint8_t *q=p+(int64_t)(k>>1)*words*2+(k&1)*W;
        uint32_t u; memcpy(&u,q,4);
        __m256i idx=_mm256_set1_epi32((int)u);
        if (v==FULL) acc[k]=_mm256_add_ps(acc[k],_mm256_permutevar8x32_ps(tab,_mm256_srlv_epi32(idx,sh)));
        else if (v==NOLOOKUP) acc[k]=_mm256_add_ps(acc[k],_mm256_castsi256_ps(_mm256_srlv_epi32(idx,sh)));
        else if (v==NOSHIFT) acc[k]=_mm256_add_ps(acc[k],_mm256_permutevar8x32_ps(tab,idx));
        else if (v==LOADONLY) acc[k]=_mm256_add_ps(acc[k],_mm256_castsi256_ps(idx));
        else { /* qwin: one 64-bit broadcast per group, both halves from it: half1 = srlv of (window >> 8W) */
          if (k&1) continue;
          uint64_t u8; memcpy(&u8,q,8);
          __m256i w64=_mm256_set1_epi64x((long long)u8);
          __m256i lo=_mm256_srlv_epi32(w64, sh); /* lanes 0..7 take low dword? no: alternate lo/hi dwords */
          __m256i hi=_mm256_srlv_epi32(_mm256_shuffle_epi32(w64, 0x55), sh2);
          acc[k]=_mm256_add_ps(acc[k],_mm256_permutevar8x32_ps(tab,lo));
          acc[k+1]=_mm256_add_ps(acc[k+1],_mm256_permutevar8x32_ps(tab,hi));
        }
      }
    }
    for(int k=0;k<8;++k) _mm256_storeu_ps(out+g*16+8*k% (GROUPS*16-8), acc[k]);
  }
}
__attribute__((target("avx2,fma"))) static void run(int v,int g0,int g1){switch(v){case 0:runv(0,g0,g1);break;case 1:runv(1,g0,g1);break;case 2:runv(2,g0,g1);break;case 3:runv(3,g0,g1);break;default:runv(4,g0,g1);}}
int main(){
  size_t n=(size_t)GROUPS*COLS*W+64; codes=aligned_alloc(64,n*2); for(size_t i=0;i<n;++i) codes[i]=(uint16_t)(rand());
  tables=aligned_alloc(64,COLS*16*4+64); for(int i=0;i<COLS*16;++i) tables[i]=(float)(i%7);
  for(int th=1;th<=2;++th) for(int v=0;v<VARIANTS;++v){
    double best=1e9;
    for(int rep=0;rep<40;++rep){
      double t0=now();
#pragma omp parallel num_threads(th)
      { int me=omp_get_thread_num(), per=(GROUPS/4+th-1)/th*4; int a=me*per, b=a+per>GROUPS?GROUPS:a+per; run(v,a,b); }
      double dt=now()-t0; if(dt<best)best=dt;
    }
    double per16 = best*1e9/((double)GROUPS*COLS)*th;
    printf("th%d %-9s %.3f ms  %.3f ns/16w/thread  %.1f GB/s codes\n",th,NAMES[v],best*1e3,per16,(double)GROUPS*COLS*W*2/best/1e9);
  }
}
