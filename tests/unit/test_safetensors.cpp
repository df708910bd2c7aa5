// Tests of the safetensors reader/writer: exact bytes against the spec, round
// trips, and every kind of corrupt file rejected with an error naming the file.
#include "support/files.h"
#include "train/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <sstream>

#include "util/atomic_file.h"
#include "util/error.h"

namespace fs = std::filesystem;
using speedrun::SafetensorsFile;
using speedrun::SafetensorsHeader;
using speedrun::TensorView;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("speedrun_test_st_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file with this exact header text (no padding) followed by data.
std::string raw_file(const std::string& header, const std::string& data) {
  return u64_le(header.size()) + header + data;
}

template <typename T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

template <typename Reader>
std::string error_of(const fs::path& p) {
  try {
    Reader::open_or_read(p.string());
  } catch (const speedrun::Error& e) {
    return e.what();
  }
  return "<no error>";
}

struct OpenWhole {
  static void open_or_read(const std::string& path) { SafetensorsFile::open(path); }
};
struct ReadHeader {
  static void open_or_read(const std::string& path) { SafetensorsHeader::read(path); }
};

// Opening must fail with a message naming the file and containing `problem`; so must reading
// the header alone, since every problem but the data's size is found in the header.
void expect_open_error(const fs::path& p, const std::string& problem) {
  for (const std::string& message : {error_of<OpenWhole>(p), error_of<ReadHeader>(p)}) {
    EXPECT_NE(message.find(p.string()), std::string::npos) << message;
    EXPECT_NE(message.find(problem), std::string::npos) << "wanted '" << problem << "' in: " << message;
  }
}

// Opening a file with this header and data must fail naming the file and `problem`.
void expect_header_error(const std::string& header, const std::string& data, const std::string& problem) {
  fs::path p = fresh_dir("header") / "bad.safetensors";
  write_raw(p, raw_file(header, data));
  SCOPED_TRACE(header);
  expect_open_error(p, problem);
}

TEST(Safetensors, WritesExactSpecBytes) {
  fs::path p = fresh_dir("exact") / "small.safetensors";
  std::vector<float> b = {1.0f, -2.0f};
  std::vector<uint8_t> a = {1, 2, 3};
  speedrun::write_safetensors(p.string(),
                              {{"b", "F32", {2}, as_bytes_of(b)}, {"a", "U8", {3}, as_bytes_of(a)}},
                              {{"format", "pt"}});
  // 138 bytes of JSON + 6 spaces of padding = 144 = 0x90.
  const std::string header =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},)"
      R"("__metadata__":{"format":"pt"}})"
      "      ";
  const std::string expected = std::string("\x90\0\0\0\0\0\0\0", 8) + header +
                               std::string("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8) +  // 1.0f, -2.0f
                               std::string("\x01\x02\x03", 3);
  EXPECT_EQ(read_all(p), expected);
}

TEST(Safetensors, EmptyFileWithoutMetadataIsPaddedBraces) {
  fs::path p = fresh_dir("empty") / "empty.safetensors";
  speedrun::write_safetensors(p.string(), {}, {});
  EXPECT_EQ(read_all(p), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  SafetensorsFile f = SafetensorsFile::open(p.string());
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, RoundTripsSeveralTensorsIncludingScalarAndEmpty) {
  fs::path p = fresh_dir("roundtrip") / "model.safetensors";
  std::vector<float> w = {0.5f, -1.25f, 3.0f, 4.5f, -0.0f, 1e-30f};
  std::vector<float> scalar = {42.0f};
  std::vector<float> empty;
  std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x0000, 0x7f80};
  std::vector<int64_t> steps = {-1, 0, int64_t(1) << 40};
  std::vector<uint8_t> flags = {9, 8, 7, 6, 5};
  speedrun::write_safetensors(p.string(),
                              {{"w", "F32", {2, 3}, as_bytes_of(w)},
                               {"scalar", "F32", {}, as_bytes_of(scalar)},
                               {"empty", "F32", {0, 3}, as_bytes_of(empty)},
                               {"h", "BF16", {2, 2}, as_bytes_of(bf16)},
                               {"step", "I64", {3}, as_bytes_of(steps)},
                               {"flags", "U8", {5}, as_bytes_of(flags)}},
                              {{"step", "1750"}, {"recipe", "speedrun \"jan-2025\""}});

  SafetensorsFile f = SafetensorsFile::open(p.string());
  EXPECT_EQ(f.names(), (std::vector<std::string>{"w", "scalar", "empty", "h", "step", "flags"}));
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"step", "1750"}, {"recipe", "speedrun \"jan-2025\""}}));
  EXPECT_TRUE(f.contains("h"));
  EXPECT_FALSE(f.contains("H"));

  EXPECT_EQ(f.read_f32("w", {2, 3}), w);
  EXPECT_EQ(f.read_f32("scalar", {}), scalar);
  EXPECT_EQ(f.read_f32("empty", {0, 3}), empty);
  EXPECT_EQ(f.info("empty").shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(f.info("scalar").shape, std::vector<int64_t>{});

  EXPECT_EQ(f.info("h").dtype, "BF16");
  EXPECT_EQ(f.info("h").shape, (std::vector<int64_t>{2, 2}));
  auto h = f.bytes("h");
  ASSERT_EQ(h.size(), 8u);
  EXPECT_EQ(std::memcmp(h.data(), bf16.data(), 8), 0);

  EXPECT_EQ(f.info("step").dtype, "I64");
  auto s = f.bytes("step");
  ASSERT_EQ(s.size(), 24u);
  EXPECT_EQ(std::memcmp(s.data(), steps.data(), 24), 0);

  auto fl = f.bytes("flags");
  ASSERT_EQ(fl.size(), 5u);
  EXPECT_EQ(std::memcmp(fl.data(), flags.data(), 5), 0);
  EXPECT_EQ(f.info("flags").data_begin, 4u * 6 + 4 + 0 + 8 + 24);
  EXPECT_EQ(f.info("flags").data_end, 4u * 6 + 4 + 0 + 8 + 24 + 5);
}

TEST(Safetensors, WriteRejectsBadTensors) {
  fs::path p = fresh_dir("badwrite") / "x.safetensors";
  std::vector<float> two = {1, 2};
  auto expect_write_error = [&](const std::vector<TensorView>& tensors, const std::string& problem) {
    try {
      speedrun::write_safetensors(p.string(), tensors, {});
      ADD_FAILURE() << "expected an error for " << problem;
    } catch (const speedrun::Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find(p.string()), std::string::npos) << m;
      EXPECT_NE(m.find(problem), std::string::npos) << m;
    }
    EXPECT_FALSE(fs::exists(p));
  };
  expect_write_error({{"a", "F32", {2}, as_bytes_of(two)}, {"a", "F32", {2}, as_bytes_of(two)}}, "used twice");
  expect_write_error({{"a", "F32", {3}, as_bytes_of(two)}}, "has 8 bytes but F32 [3] needs 12");
  expect_write_error({{"a", "F16", {2}, as_bytes_of(two)}}, "has 8 bytes but F16 [2] needs 4");
  expect_write_error({{"a", "F33", {2}, as_bytes_of(two)}}, "unknown dtype 'F33'");
  expect_write_error({{"a", "F32", {-2}, as_bytes_of(two)}}, "negative dimension");
  expect_write_error({{"__metadata__", "F32", {2}, as_bytes_of(two)}}, "reserved");
}

TEST(Safetensors, TruncatedFilesAreRejectedNamingTheFile) {
  fs::path dir = fresh_dir("truncate");
  fs::path good = dir / "good.safetensors";
  std::vector<float> w = {1, 2, 3, 4, 5, 6};
  std::vector<float> v = {7, 8};
  speedrun::write_safetensors(good.string(), {{"w", "F32", {2, 3}, as_bytes_of(w)}, {"v", "F32", {2}, as_bytes_of(v)}},
                              {{"k", "v"}});
  const std::string bytes = read_all(good);
  const uint64_t header_size = 8 + static_cast<uint8_t>(bytes[0]);
  ASSERT_EQ(bytes.size(), header_size + 32);

  fs::path p = dir / "cut.safetensors";
  const std::vector<std::pair<size_t, std::string>> cuts = {
      {0, "too short"},
      {5, "too short"},
      {7, "too short"},
      {8, "header length"},
      {40, "header length"},
      {header_size - 1, "header length"},
      {header_size, "run past the data section"},
      {header_size + 10, "run past the data section"},
      {bytes.size() - 1, "run past the data section"},
  };
  for (const auto& [size, problem] : cuts) {
    SCOPED_TRACE("truncated to " + std::to_string(size));
    write_raw(p, bytes.substr(0, size));
    expect_open_error(p, problem);
  }
}

// The header alone is read for metadata: here of a file whose data section (a hole in a
// sparse file) is larger than memory, which a full open refuses by name before allocating.
TEST(Safetensors, HeaderIsReadWithoutTheDataAndADataSectionLargerThanMemoryIsRefused) {
  fs::path p = fresh_dir("huge") / "huge.safetensors";
  const uint64_t size = speedrun::testing::more_than_memory_bytes();
  if (!speedrun::testing::write_sparse_safetensors(p, size, R"({"step":"5"})")) {
    GTEST_SKIP() << "this file system cannot hold a sparse file of " << size << " bytes";
  }
  const SafetensorsHeader header = SafetensorsHeader::read(p.string());
  EXPECT_EQ(header.metadata(), (std::map<std::string, std::string>{{"step", "5"}}));
  EXPECT_EQ(header.names(), std::vector<std::string>{"huge"});
  EXPECT_EQ(header.info("huge").shape, std::vector<int64_t>{static_cast<int64_t>(size)});
  EXPECT_EQ(header.data_size(), size);
  const std::string refusal = error_of<OpenWhole>(p);
  EXPECT_NE(refusal.find(p.string()), std::string::npos) << refusal;
  EXPECT_NE(refusal.find("its data section of " + std::to_string(size) + " bytes is larger than this machine's memory"),
            std::string::npos)
      << refusal;
  // One byte short: the layout is checked against the file's size without reading it.
  fs::resize_file(p, fs::file_size(p) - 1);
  expect_open_error(p, "run past the data section");
  fs::remove(p);
}

TEST(Safetensors, AbsurdHeaderLengthIsRejected) {
  fs::path p = fresh_dir("absurd") / "a.safetensors";
  write_raw(p, u64_le(uint64_t(1) << 62) + "{}");
  expect_open_error(p, "header length 4611686018427387904");
  write_raw(p, u64_le(3) + "{}");  // one byte longer than what follows
  expect_open_error(p, "header length 3");
  // Over the 100 MB limit, even though the file is large enough.
  const uint64_t too_big = 100'000'001;
  write_raw(p, u64_le(too_big));
  fs::resize_file(p, 8 + too_big + 100);  // sparse: costs no disk
  expect_open_error(p, "header length 100000001");
  fs::remove(p);
}

TEST(Safetensors, MissingFileIsAnErrorNamingIt) {
  fs::path p = fresh_dir("missing") / "nope.safetensors";
  expect_open_error(p, "does not exist");
}

TEST(Safetensors, ADirectoryIsAnErrorNamingIt) {
  expect_open_error(fresh_dir("a_directory"), "is a directory, not a file");
}

TEST(Safetensors, MalformedHeadersAreRejected) {
  const std::string f32x2(8, '\0');
  expect_header_error(R"({"a":)", f32x2, "not valid JSON");
  expect_header_error(R"([1,2])", "", "expected an object");
  expect_header_error(R"("x")", "", "expected an object");
  expect_header_error(R"({"a":[1]})", f32x2, "tensor 'a': header entry is array");
  expect_header_error(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", f32x2, "tensor 'a': header entry has no 'dtype'");
  expect_header_error(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", f32x2, "has no 'shape'");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2]}})", f32x2, "has no 'data_offsets'");
  expect_header_error(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", f32x2, "dtype is number");
  expect_header_error(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", f32x2, "unknown dtype 'F33'");
  expect_header_error(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", f32x2, "shape is number");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", f32x2, "expected integers");
  expect_header_error(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", f32x2, "expected integers");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2, "negative dimension -2");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", f32x2, "expected [begin, end]");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":"0,8"}})", f32x2, "expected [begin, end]");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", f32x2, "expected [begin, end]");
  expect_header_error(R"({"__metadata__":{"step":5}})", "", "value of 'step' is number, expected a string");
  expect_header_error(R"({"__metadata__":["a"]})", "", "__metadata__ is not a JSON object");
}

TEST(Safetensors, BadDataOffsetsAreRejected) {
  const std::string data16(16, '\0');
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,24]}})", data16,
                      "tensor 'a': data_offsets [8,24] run past the data section of 16 bytes");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data16, "end before begin");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data16,
                      "hold 16 bytes but F32 [3] needs 12");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", data16,
                      "needs more than 2^64");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                      std::string(12, '\0'), "tensors 'a' and 'b' overlap");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                      std::string(8, '\0'), "overlap");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data16,
                      "unused bytes [0, 8) before tensor 'a'");
  expect_header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data16,
                      "data section has 16 bytes but the tensors cover 8");
}

TEST(Safetensors, AcceptsForeignButValidLayouts) {
  // Header order differs from data order, padding is absent, metadata comes first:
  // names() follows the data.
  fs::path p = fresh_dir("foreign") / "f.safetensors";
  write_raw(p, raw_file(R"({"__metadata__":{"format":"pt"},)"
                        R"("late":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                        R"("early":{"dtype":"I16","shape":[],"data_offsets":[0,2]}} )",
                        std::string("\x34\x12\x07", 3)));
  SafetensorsFile f = SafetensorsFile::open(p.string());
  EXPECT_EQ(f.names(), (std::vector<std::string>{"early", "late"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(static_cast<uint8_t>(f.bytes("late")[0]), 7);
  int16_t early = 0;
  std::memcpy(&early, f.bytes("early").data(), 2);
  EXPECT_EQ(early, 0x1234);
}

TEST(Safetensors, WrongRequestsNameFileTensorExpectedAndActual) {
  fs::path p = fresh_dir("requests") / "m.safetensors";
  std::vector<float> w(6, 1.0f);
  std::vector<uint16_t> h(4, 0);
  speedrun::write_safetensors(p.string(), {{"w", "F32", {2, 3}, as_bytes_of(w)}, {"h", "BF16", {4}, as_bytes_of(h)}},
                              {});
  SafetensorsFile f = SafetensorsFile::open(p.string());
  auto error_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const speedrun::Error& e) {
      return e.what();
    }
    return "<no error>";
  };
  const std::string file = "'" + p.string() + "'";
  std::string m = error_of([&] { f.read_f32("w", {3, 2}); });
  EXPECT_NE(m.find(file), std::string::npos) << m;
  EXPECT_NE(m.find("tensor 'w' is F32 [2, 3], expected F32 [3, 2]"), std::string::npos) << m;

  m = error_of([&] { f.read_f32("h", {4}); });
  EXPECT_NE(m.find(file), std::string::npos) << m;
  EXPECT_NE(m.find("tensor 'h' is BF16 [4], expected F32 [4]"), std::string::npos) << m;

  for (auto call : std::vector<std::function<void()>>{[&] { f.read_f32("ghost", {1}); }, [&] { f.info("ghost"); },
                                                      [&] { f.bytes("ghost"); }}) {
    m = error_of(call);
    EXPECT_NE(m.find(file), std::string::npos) << m;
    EXPECT_NE(m.find("no tensor named 'ghost'"), std::string::npos) << m;
  }
}

TEST(Safetensors, FailedWriteLeavesEarlierFileIntact) {
  fs::path dir = fresh_dir("atomic");
  fs::path p = dir / "ckpt.safetensors";
  std::vector<float> old_values = {1, 2};
  speedrun::write_safetensors(p.string(), {{"w", "F32", {2}, as_bytes_of(old_values)}}, {{"step", "1"}});
  const std::string before = read_all(p);

  std::vector<float> new_values(1000, 3.0f);
  speedrun::set_write_budget_for_testing(100);  // header fits, the tensor data does not
  try {
    speedrun::write_safetensors(p.string(), {{"w", "F32", {1000}, as_bytes_of(new_values)}}, {{"step", "2"}});
    ADD_FAILURE() << "expected a full-disk error";
  } catch (const speedrun::Error& e) {
    EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No space left"), std::string::npos) << e.what();
  }
  speedrun::set_write_budget_for_testing(-1);

  EXPECT_EQ(read_all(p), before);
  EXPECT_EQ(SafetensorsFile::open(p.string()).metadata().at("step"), "1");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

}  // namespace
