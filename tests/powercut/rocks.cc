// Driver and checker of the RocksDB power-cut test (tests/powercut.rs).
//
//   rocks write DB COUNT   Put key i (i = 0..COUNT) with sync=true; print "ack i" once
//                          each Put returned. Small memtables and SST files, so that
//                          the run flushes (a new WAL each time), compacts and appends
//                          version edits to the MANIFEST.
//   rocks check DB ACKED   DB::Open (recovery); every key i < ACKED present with its
//                          value; every key present has its value and the keys present
//                          are a prefix 0..n (Puts are acknowledged in order).
#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

static std::string key(long i) {
    char b[32];
    std::snprintf(b, sizeof b, "key%08ld", i);
    return b;
}

// Values of arbitrary lengths (1 to 3000 bytes), so that WAL records end anywhere.
static std::string value(long i) {
    std::string v = "v" + std::to_string(i) + ":";
    size_t n = 1 + (static_cast<size_t>(i) * 7919) % 3000;
    v.append(n, static_cast<char>('a' + i % 26));
    return v;
}

static rocksdb::Options options() {
    rocksdb::Options o;
    o.paranoid_checks = true;
    o.write_buffer_size = 64 << 10;
    o.max_write_buffer_number = 2;
    o.target_file_size_base = 64 << 10;
    o.max_bytes_for_level_base = 256 << 10;
    o.level0_file_num_compaction_trigger = 2;
    o.max_manifest_file_size = 16 << 10;
    return o;
}

static int write(const std::string& dir, long count) {
    rocksdb::Options o = options();
    o.create_if_missing = true;
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(o, dir, &raw);
    if (!s.ok()) {
        std::fprintf(stderr, "open: %s\n", s.ToString().c_str());
        return 1;
    }
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteOptions w;
    w.sync = true;
    for (long i = 0; i < count; i++) {
        s = db->Put(w, key(i), value(i));
        if (!s.ok()) {
            std::fprintf(stderr, "put %ld: %s\n", i, s.ToString().c_str());
            return 1;
        }
        std::printf("ack %ld\n", i);
        std::fflush(stdout);
    }
    s = db->Close();
    if (!s.ok()) {
        std::fprintf(stderr, "close: %s\n", s.ToString().c_str());
        return 1;
    }
    return 0;
}

static int check(const std::string& dir, long acked) {
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(options(), dir, &raw);
    if (!s.ok()) {
        std::printf("DB::Open failed: %s\n", s.ToString().c_str());
        return 1;
    }
    std::unique_ptr<rocksdb::DB> db(raw);
    for (long i = 0; i < acked; i++) {
        std::string v;
        s = db->Get(rocksdb::ReadOptions(), key(i), &v);
        if (!s.ok()) {
            std::printf("acknowledged key %ld: %s\n", i, s.ToString().c_str());
            return 1;
        }
        if (v != value(i)) {
            std::printf("acknowledged key %ld has a wrong value\n", i);
            return 1;
        }
    }
    long n = 0;
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next(), n++) {
        if (it->key().ToString() != key(n) || it->value().ToString() != value(n)) {
            std::printf("entry %ld is %s, not key %ld with its value\n", n,
                        it->key().ToString().c_str(), n);
            return 1;
        }
    }
    if (!it->status().ok()) {
        std::printf("iterator: %s\n", it->status().ToString().c_str());
        return 1;
    }
    if (n < acked) {
        std::printf("%ld keys, %ld acknowledged\n", n, acked);
        return 1;
    }
    std::printf("ok: %ld keys (%ld acknowledged)\n", n, acked);
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 4 && std::string(argv[1]) == "write") return write(argv[2], std::atol(argv[3]));
    if (argc == 4 && std::string(argv[1]) == "check") return check(argv[2], std::atol(argv[3]));
    std::fprintf(stderr, "usage: rocks write DB COUNT | rocks check DB ACKED\n");
    return 2;
}
